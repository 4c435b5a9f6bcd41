"""The optimal allocation: a pure, deterministic function of a ``Snapshot``.

A model is cut into K blocks; the chain is N workers in order, worker 0 being the source.
An allocation is ``boundaries = (b0, ..., bN)`` with ``0 = b0 <= ... <= bN = K``; worker n
runs the segment ``[boundaries[n], boundaries[n + 1])``. A worker with an empty segment is
left out of the chain and has no stage, except the source when ``must_include_source`` is set:
it always stays in the chain and, if it runs no blocks, its stage is shipping the input.

Stage time of worker n running ``[a, b)``::

    sum(block_ms[n][a:b]) + activation_bytes[b] / bandwidth_Bps[n] * 1000 + latency_ms[n]

i.e. compute plus shipping the output activation to the next worker; the last worker ships the
result back to the source. When the source itself runs the last block the result is already
home, so that stage has no shipping term. Sums of times are correctly rounded (``math.fsum``
semantics), so a stage time does not depend on the order the terms are added in.

``solve`` returns the exact optimum: the minimal bottleneck (max stage time); among the
allocations whose bottleneck is within ``BOTTLENECK_RTOL`` of that minimum, the lowest
end-to-end latency (sum of stage times, compared exactly), then the fewest workers, then the
lexicographically smallest boundaries. Workers marked in ``must_use`` run at least one block
whatever it costs (``--min-workers``). It runs two dynamic programmes over (worker, boundary),
each O(N * K^2): the min-bottleneck, then the min-latency with every stage under the bottleneck.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engines.errors import ArmdiError

__all__ = [
    "BOTTLENECK_RTOL",
    "Allocation",
    "AllocationError",
    "Snapshot",
    "evaluate",
    "even_split",
    "scale",
    "snapshot_from_profile",
    "solve",
    "stage_time",
    "why_left_out",
]

BOTTLENECK_RTOL = 1e-9
"""Bottlenecks within this relative distance of the minimum count as equal (tie-break next)."""

# Every finite float is an integer multiple of 2**-1074, so sums of stage times scaled by
# 2**1074 are exact Python ints: the latency tie-break compares exact sums, not rounded ones.
_SCALE_BITS = 1074


class AllocationError(ArmdiError):
    """A snapshot or an allocation is malformed, or no allocation satisfies the constraints."""


@dataclass(frozen=True)
class Snapshot:
    """Everything the solver looks at: per-worker block times, activation sizes, links.

    Construction validates and normalises (lists become tuples, numbers become floats/ints),
    so every ``Snapshot`` in existence is well formed.
    """

    block_ms: tuple[tuple[float, ...], ...]
    """``block_ms[n][k]``: worker n's compute time for block k (ms); N rows of K entries."""
    activation_bytes: tuple[int, ...]
    """Bytes per sample at boundary b, K + 1 entries: b = 0 is the input, b = K the output."""
    bandwidth_Bps: tuple[float, ...]
    """Worker n's outgoing link rate in bytes/s (``math.inf``: a free link)."""
    latency_ms: tuple[float, ...]
    """Worker n's per-hop latency on its outgoing link (ms)."""
    max_blocks: tuple[int | None, ...] | None = None
    """Memory cap: at most this many blocks on worker n (``None``: unlimited)."""
    must_include_source: bool = True
    """Worker 0 (the source) always stays in the chain, possibly running zero blocks."""
    must_use: tuple[bool, ...] | None = None
    """Worker n must run at least one block (``armdi up --min-workers``): the user insists on
    it even where the optimum would leave it out. ``None``: no worker is forced."""

    def __post_init__(self) -> None:
        rows = tuple(
            tuple(
                _time(t, f"block_ms[{n}][{k}]") for k, t in enumerate(_seq(row, f"block_ms[{n}]"))
            )
            for n, row in enumerate(_seq(self.block_ms, "block_ms"))
        )
        if not rows:
            raise AllocationError("block_ms: need at least one worker (got 0 rows)")
        blocks = len(rows[0])
        if blocks < 1:
            raise AllocationError("block_ms: need at least one block (worker 0 has 0)")
        for n, row in enumerate(rows):
            if len(row) != blocks:
                raise AllocationError(
                    f"block_ms: ragged rows: worker 0 has {blocks} blocks, worker {n} has "
                    f"{len(row)}"
                )
        workers = len(rows)
        sizes = tuple(_seq(self.activation_bytes, "activation_bytes"))
        if len(sizes) != blocks + 1:
            raise AllocationError(
                f"activation_bytes: need K + 1 = {blocks + 1} entries (one per boundary), "
                f"got {len(sizes)}"
            )
        for b, size in enumerate(sizes):
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise AllocationError(
                    f"activation_bytes[{b}]: must be a non-negative int, got {size!r}"
                )
        bandwidth = _per_worker(self.bandwidth_Bps, "bandwidth_Bps", workers)
        for n, rate in enumerate(bandwidth):
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not rate > 0:
                raise AllocationError(
                    f"bandwidth_Bps[{n}]: must be > 0 bytes/s (math.inf for a free link), "
                    f"got {rate!r}"
                )
        latency = tuple(
            _time(t, f"latency_ms[{n}]")
            for n, t in enumerate(_per_worker(self.latency_ms, "latency_ms", workers))
        )
        caps: tuple[int | None, ...] | None = None
        if self.max_blocks is not None:
            caps = tuple(_per_worker(self.max_blocks, "max_blocks", workers))
            for n, cap in enumerate(caps):
                if cap is not None and (
                    isinstance(cap, bool) or not isinstance(cap, int) or cap < 0
                ):
                    raise AllocationError(
                        f"max_blocks[{n}]: must be a non-negative int or None, got {cap!r}"
                    )
        forced: tuple[bool, ...] | None = None
        if self.must_use is not None:
            forced = tuple(bool(f) for f in _per_worker(self.must_use, "must_use", workers))
            for n, flag in enumerate(forced):
                if flag and caps is not None and caps[n] == 0:
                    raise AllocationError(
                        f"must_use[{n}]: worker {n} must run a block but max_blocks[{n}] = 0"
                    )
            if sum(forced) > blocks:
                raise AllocationError(
                    f"must_use: {sum(forced)} workers must each run a block, the model has "
                    f"only {blocks}"
                )
        object.__setattr__(self, "block_ms", rows)
        object.__setattr__(self, "activation_bytes", tuple(int(s) for s in sizes))
        object.__setattr__(self, "bandwidth_Bps", tuple(float(r) for r in bandwidth))
        object.__setattr__(self, "latency_ms", latency)
        object.__setattr__(self, "max_blocks", caps)
        object.__setattr__(self, "must_include_source", bool(self.must_include_source))
        object.__setattr__(self, "must_use", forced)

    @property
    def workers(self) -> int:
        """N, the number of workers in the chain (source included)."""
        return len(self.block_ms)

    @property
    def blocks(self) -> int:
        """K, the number of blocks."""
        return len(self.block_ms[0])

    def cap(self, n: int) -> int:
        """The most blocks worker n may run."""
        cap = None if self.max_blocks is None else self.max_blocks[n]
        return self.blocks if cap is None else min(self.blocks, cap)

    def must_stay(self, n: int) -> bool:
        """Whether worker n stays in the chain even with an empty segment."""
        return n == 0 and self.must_include_source

    def forced(self, n: int) -> bool:
        """Whether worker n must run at least one block."""
        return self.must_use is not None and self.must_use[n]


@dataclass(frozen=True)
class Allocation:
    """An allocation and what it costs under one snapshot. Build it with ``evaluate``."""

    boundaries: tuple[int, ...]
    """``N + 1`` ints, ``0 = b0 <= ... <= bN = K``; worker n runs ``[b[n], b[n + 1])``."""
    stage_ms: tuple[float, ...]
    """Stage time per worker (0.0 for a worker left out)."""
    bottleneck_ms: float
    """The largest stage time: one input leaves the pipeline every ``bottleneck_ms``."""
    latency_ms: float
    """End-to-end latency of one input: the (correctly rounded) sum of the used stages."""
    used: tuple[int, ...]
    """Indices of the workers in the chain, in chain order."""

    @property
    def throughput_per_s(self) -> float:
        """Inputs per second in steady state, ``1000 / bottleneck_ms``."""
        return math.inf if self.bottleneck_ms == 0 else 1000.0 / self.bottleneck_ms

    def segment(self, n: int) -> tuple[int, int]:
        """Worker n's segment ``(start, end)``; ``start == end`` for an empty one."""
        if not 0 <= n < len(self.boundaries) - 1:
            raise AllocationError(
                f"no worker {n}: this allocation has workers 0..{len(self.boundaries) - 2}"
            )
        return self.boundaries[n], self.boundaries[n + 1]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (``Infinity`` throughput when every stage costs nothing)."""
        return {
            "boundaries": list(self.boundaries),
            "segments": [list(self.segment(n)) for n in range(len(self.boundaries) - 1)],
            "stage_ms": list(self.stage_ms),
            "bottleneck_ms": self.bottleneck_ms,
            "latency_ms": self.latency_ms,
            "throughput_per_s": self.throughput_per_s,
            "used": list(self.used),
        }


def stage_time(snapshot: Snapshot, n: int, start: int, end: int) -> float:
    """Worker n's stage time (ms) for the segment ``[start, end)``.

    Compute plus shipping the activation at ``end`` to the next worker, plus the hop latency;
    nothing is shipped when the source (worker 0) runs through the last block. For an empty
    segment this is the cost of forwarding the activation untouched (the source shipping the
    input); ``evaluate`` gives a left-out worker no stage at all.
    """
    compute = snapshot.block_ms[n][start:end]
    if n == 0 and end == snapshot.blocks:
        return _fsum(compute)
    return _fsum((*compute, _transfer_ms(snapshot, n, end), snapshot.latency_ms[n]))


def evaluate(snapshot: Snapshot, boundaries: Sequence[int]) -> Allocation:
    """Cost a given allocation; raises ``AllocationError`` if it is malformed or over a cap."""
    bounds = _check_boundaries(snapshot, boundaries)
    stages: list[float] = []
    used: list[int] = []
    for n in range(snapshot.workers):
        start, end = bounds[n], bounds[n + 1]
        if end - start > snapshot.cap(n):
            raise AllocationError(
                f"worker {n} runs {end - start} blocks [{start}, {end}) but max_blocks[{n}] = "
                f"{snapshot.cap(n)}"
            )
        if end == start and snapshot.forced(n):
            raise AllocationError(f"worker {n} must run at least one block (must_use), got "
                                  f"[{start}, {end})")
        if end > start or snapshot.must_stay(n):
            stages.append(stage_time(snapshot, n, start, end))
            used.append(n)
        else:
            stages.append(0.0)
    used_stages = [stages[n] for n in used]
    return Allocation(
        boundaries=bounds,
        stage_ms=tuple(stages),
        bottleneck_ms=max(used_stages),
        latency_ms=_fsum(used_stages),
        used=tuple(used),
    )


def solve(snapshot: Snapshot) -> Allocation:
    """The optimal allocation (see the module docstring for the objective and tie-breaks).

    Raises ``AllocationError`` when no allocation exists (the caps leave blocks unplaced, or
    every allocation has an infinite stage time).
    """
    table = _StageTable(snapshot)
    bottleneck = _min_bottleneck(snapshot, table)
    if math.isinf(bottleneck):
        caps = sum(snapshot.cap(n) for n in range(snapshot.workers))
        if caps < snapshot.blocks:
            raise AllocationError(
                f"no allocation fits: max_blocks allow {caps} blocks in all, the model has "
                f"{snapshot.blocks}"
            )
        raise AllocationError("no allocation has a finite bottleneck (check the link rates)")
    limit = bottleneck + bottleneck * BOTTLENECK_RTOL
    return evaluate(snapshot, _min_latency(snapshot, table, limit))


def why_left_out(snapshot: Snapshot, optimum: Allocation, n: int) -> str:
    """Why the optimum gives worker n no blocks, in words: what using it would cost.

    Solves the snapshot again with worker n forced to run at least one block and compares
    the best such allocation with ``optimum``.
    """
    if n in optimum.used:
        return ""
    if snapshot.cap(n) == 0:
        return "its max_blocks is 0"
    forced = list(snapshot.must_use or (False,) * snapshot.workers)
    forced[n] = True
    try:
        using = solve(dataclasses.replace(snapshot, must_use=tuple(forced)))
    except AllocationError as exc:
        return f"no allocation can use it ({exc})"
    return (
        f"the optimum leaves it out: using it gives a bottleneck of "
        f"{using.bottleneck_ms:.3g} ms and a latency of {using.latency_ms:.3g} ms, against "
        f"{optimum.bottleneck_ms:.3g} ms and {optimum.latency_ms:.3g} ms without it: it does "
        f"not pay; --min-workers (cluster.min_workers) insists on using it"
    )


def even_split(blocks: int, workers: int) -> tuple[int, ...]:
    """Boundaries giving every worker ``blocks // workers`` blocks, the first ones one more."""
    if workers < 1 or blocks < 0:
        raise AllocationError(
            f"even_split needs blocks >= 0 and workers >= 1, got {blocks}, {workers}"
        )
    base, extra = divmod(blocks, workers)
    bounds = [0]
    for n in range(workers):
        bounds.append(bounds[-1] + base + (1 if n < extra else 0))
    return tuple(bounds)


def scale(block_ms: Sequence[float], slowdown: float) -> tuple[float, ...]:
    """Block times of a node emulated ``slowdown`` times slower (compute, then wait)."""
    if not (isinstance(slowdown, (int, float)) and math.isfinite(slowdown) and slowdown > 0):
        raise AllocationError(f"slowdown: must be a finite number > 0, got {slowdown!r}")
    return tuple(float(t) * slowdown for t in block_ms)


def snapshot_from_profile(
    block_ms_per_worker: Sequence[Sequence[float]],
    activation_bytes: Sequence[int],
    *,
    bandwidth_Bps: float | Sequence[float] = math.inf,
    latency_ms: float | Sequence[float] = 0.0,
    slowdown: Sequence[float] | None = None,
    max_blocks: Sequence[int | None] | None = None,
    must_include_source: bool = True,
    must_use: Sequence[bool] | None = None,
) -> Snapshot:
    """A snapshot from profiled block times; scalars for links apply to every worker.

    ``slowdown[n]`` multiplies worker n's block times (emulated heterogeneity).
    """
    rows = [tuple(row) for row in block_ms_per_worker]
    workers = len(rows)
    if slowdown is not None:
        factors = _per_worker(slowdown, "slowdown", workers)
        rows = [scale(row, factor) for row, factor in zip(rows, factors, strict=True)]
    return Snapshot(
        block_ms=tuple(rows),
        activation_bytes=tuple(activation_bytes),
        bandwidth_Bps=_broadcast(bandwidth_Bps, workers),
        latency_ms=_broadcast(latency_ms, workers),
        max_blocks=None if max_blocks is None else tuple(max_blocks),
        must_include_source=must_include_source,
        must_use=None if must_use is None else tuple(must_use),
    )


# --- the two dynamic programmes ------------------------------------------------------------


class _StageTable:
    """Stage times of every allowed (worker, start, end), built in O(N * K^2).

    ``rows[n][end]`` lists ``(start, stage_ms)`` for the segments worker n may run that end at
    ``end``: non-empty, within its cap, plus the empty segment ``[0, 0)`` for a source that must
    stay. Compute sums come from exact integer prefix sums, rounded once.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        blocks = snapshot.blocks
        self.rows: list[list[list[tuple[int, float]]]] = []
        for n in range(snapshot.workers):
            prefix = [0]
            for t in snapshot.block_ms[n]:
                prefix.append(prefix[-1] + _exact(t))
            by_end: list[list[tuple[int, float]]] = [[] for _ in range(blocks + 1)]
            if snapshot.must_stay(n) and not snapshot.forced(n):
                by_end[0].append((0, stage_time(snapshot, n, 0, 0)))
            for end in range(1, blocks + 1):
                # shipping cost after the segment, exact; None when the link cannot carry it
                tail: int | None = 0  # the source running the last block holds the result
                if not (n == 0 and end == blocks):
                    transfer = _transfer_ms(snapshot, n, end)
                    tail = (
                        None
                        if math.isinf(transfer)
                        else (_exact(transfer) + _exact(snapshot.latency_ms[n]))
                    )
                for start in range(max(0, end - snapshot.cap(n)), end):
                    stage = (
                        math.inf if tail is None else _to_float(prefix[end] - prefix[start] + tail)
                    )
                    by_end[end].append((start, stage))
            self.rows.append(by_end)


def _min_bottleneck(snapshot: Snapshot, table: _StageTable) -> float:
    """min over allocations of the largest used stage time (exact: only max/min are taken)."""
    blocks = snapshot.blocks
    best = [0.0] + [math.inf] * blocks  # best[b]: workers so far cover [0, b)
    for n in range(snapshot.workers):
        nxt = [math.inf] * (blocks + 1)
        for end in range(blocks + 1):
            stays = snapshot.must_stay(n) or snapshot.forced(n)
            value = math.inf if stays else best[end]  # worker n left out
            for start, stage in table.rows[n][end]:
                value = min(value, max(best[start], stage))
            nxt[end] = value
        best = nxt
    return best[blocks]


_Key = tuple[int, int, tuple[int, ...]]  # (exact latency, workers used, boundaries so far)


def _min_latency(snapshot: Snapshot, table: _StageTable, limit: float) -> tuple[int, ...]:
    """Boundaries of min (latency, workers, boundaries) with every stage <= ``limit``.

    The key of a prefix decides the key of every completion it is part of (sums are exact and
    prefixes of one state have boundary tuples of equal length ending alike), so keeping the
    best key per (worker, boundary) is exact.
    """
    blocks = snapshot.blocks
    best: list[_Key | None] = [(0, 0, (0,))] + [None] * blocks
    for n in range(snapshot.workers):
        nxt: list[_Key | None] = [None] * (blocks + 1)
        for end in range(blocks + 1):
            chosen: _Key | None = None
            if not (snapshot.must_stay(n) or snapshot.forced(n)):
                chosen = best[end]  # worker n left out
            for start, stage in table.rows[n][end]:
                prev = best[start]
                if prev is None or not stage <= limit:
                    continue
                key = (prev[0] + _exact(stage), prev[1] + 1, prev[2])
                if chosen is None or key < chosen:
                    chosen = key
            nxt[end] = None if chosen is None else (chosen[0], chosen[1], (*chosen[2], end))
        best = nxt
    final = best[blocks]
    if final is None:  # cannot happen: the min-bottleneck allocation satisfies the limit
        raise AllocationError("internal error: no allocation under the optimal bottleneck")
    return final[2]


# --- helpers -------------------------------------------------------------------------------


def _transfer_ms(snapshot: Snapshot, n: int, boundary: int) -> float:
    try:
        return snapshot.activation_bytes[boundary] / snapshot.bandwidth_Bps[n] * 1000.0
    except OverflowError:
        return math.inf


def _fsum(values: Sequence[float]) -> float:
    try:
        return math.fsum(values)
    except OverflowError:
        return math.inf


def _exact(value: float) -> int:
    """``value * 2**1074`` as an exact int (``value`` finite)."""
    numerator, denominator = value.as_integer_ratio()
    return numerator << (_SCALE_BITS + 1 - denominator.bit_length())


def _to_float(scaled: int) -> float:
    """The float nearest to ``scaled * 2**-1074`` (int true division rounds correctly)."""
    try:
        return scaled / (1 << _SCALE_BITS)
    except OverflowError:
        return math.inf


def _time(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AllocationError(f"{what}: must be a number of milliseconds, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise AllocationError(f"{what}: must be finite and >= 0 ms, got {value!r}")
    return float(value) + 0.0  # + 0.0 turns -0.0 into 0.0


def _seq(value: object, what: str) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise AllocationError(f"{what}: must be a sequence, got {type(value).__name__}")
    return tuple(value)


def _per_worker(value: object, what: str, workers: int) -> tuple[Any, ...]:
    items = _seq(value, what)
    if len(items) != workers:
        raise AllocationError(
            f"{what}: need one entry per worker ({workers}, from block_ms), got {len(items)}"
        )
    return items


def _broadcast(value: float | Sequence[float], workers: int) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),) * workers
    return tuple(value)


def _check_boundaries(snapshot: Snapshot, boundaries: Sequence[int]) -> tuple[int, ...]:
    bounds = _seq(boundaries, "boundaries")
    workers, blocks = snapshot.workers, snapshot.blocks
    if len(bounds) != workers + 1:
        raise AllocationError(
            f"boundaries: need N + 1 = {workers + 1} entries, got {len(bounds)}: {bounds}"
        )
    if any(isinstance(b, bool) or not isinstance(b, int) for b in bounds):
        raise AllocationError(f"boundaries: must be ints, got {bounds}")
    if bounds[0] != 0 or bounds[-1] != blocks:
        raise AllocationError(f"boundaries: must start at 0 and end at K = {blocks}, got {bounds}")
    if any(a > b for a, b in itertools.pairwise(bounds)):
        raise AllocationError(f"boundaries: must be non-decreasing, got {bounds}")
    return tuple(int(b) for b in bounds)
