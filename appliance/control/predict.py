"""The analytical prediction: how long N images take in each mode, from the profile and links.

A pure function of a ``Scenario``: the profiled block times, the activation bytes at each cut
point, what the input costs on the wire (uint8 pixels, or an encoded image), every node's
outgoing link (bytes/s and latency), and the workers' relative speeds (slowdown factors: 1 is
the profiled device, 2 twice as slow). The source owns the inputs and runs no blocks unless
the mode is ``local`` (it then is the one device).

The model is the one the runtime follows (docs/runtime.md): a node handles one request at a
time, computing and then sending its output, and the send occupies its outgoing link for
``bytes / rate`` (the sender waits until it is through, as ``LinkEmulation`` does); receivers
buffer, so nothing else waits. On that model, with at most ``window`` requests in flight,
the N images are played through exactly (a small event simulation), which gives the time to
infer N images with the pipeline's fill and drain, the steady throughput, and each image's
latency under that load.

- ``local``: the source runs the whole model, one image after another.
- ``ddi``: the source ships each whole input over its one link to the worker that frees up
  first (the least loaded); workers compute side by side and return results on their links.
- ``edgepipe`` / ``armdi``: one chain at the allocator's exact optimum
  (``appliance.control.allocator.solve``) over the source (shipping the input only) and the
  workers; activations cross the links as ``wire_dtype`` (float16 halves them; results stay
  float32). Under steady conditions ``armdi`` converges to that optimum, so both predict the
  same.
- ``hybrid``: DDI over chains. The workers, in order, form chains of ``chain_workers``
  (``chain_groups``; a chain that cannot hold the model between its members' memory is left
  out), each at its own optimum; the source ships each whole input over its one link to the
  chain that would finish it first (as the runtime picks; ``ddi`` likewise picks the
  worker). ``chain_workers = 1`` is ``ddi`` over the workers that hold the
  whole model, and one chain of all of them is ``edgepipe``.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.control.allocator import Allocation, snapshot_from_profile, solve
from engines.errors import ArmdiError

MODES = ("local", "ddi", "edgepipe", "armdi", "hybrid")


class PredictionError(ArmdiError):
    """A scenario that cannot be predicted (bad numbers, an unknown mode)."""


@dataclass(frozen=True)
class Scenario:
    block_ms: tuple[float, ...]
    """Profiled compute time of each block on the reference device (ms), K entries."""
    activation_bytes: tuple[int, ...]
    """float32 bytes per sample at each boundary 0..K (0: the float32 input, K: the output)."""
    link_Bps: float
    """Every node's outgoing link rate, bytes/s (``math.inf``: free)."""
    latency_ms: float = 0.0
    """Per message on every link (ms)."""
    speeds: tuple[float, ...] = (1.0,)
    """One slowdown factor per worker (1: the profiled device)."""
    input_bytes: int | None = None
    """Bytes of one input on the wire; None: uint8 pixels, a quarter of the float32 input."""
    wire_dtype: str = "float32"
    """MDI activations on the wire: float32 | float16."""
    decode_ms: float = 0.0
    """ddi with encoded inputs: what decoding one image costs a worker (ms)."""
    overhead_ms: float = 0.0
    """The runtime's own cost per request at every node, source included (receiving,
    checking, encoding, sending, Python), on top of compute and link (ms)."""
    max_blocks: tuple[int | None, ...] | None = None
    """MDI: per worker, the most blocks its memory holds (None: no cap)."""
    chain_workers: int = 2
    """hybrid: workers per chain (the last chain takes what is left over)."""

    def __post_init__(self) -> None:
        if not self.block_ms or any(not (math.isfinite(t) and t >= 0) for t in self.block_ms):
            raise PredictionError(f"block_ms: need K >= 1 finite times >= 0, got "
                                  f"{list(self.block_ms)[:8]}")
        if len(self.activation_bytes) != len(self.block_ms) + 1 or any(
                b < 0 for b in self.activation_bytes):
            raise PredictionError(f"activation_bytes: need K + 1 = {len(self.block_ms) + 1} "
                                  f"sizes >= 0, got {len(self.activation_bytes)}")
        if not self.link_Bps > 0:
            raise PredictionError(f"link_Bps must be > 0, got {self.link_Bps}")
        for name in ("latency_ms", "decode_ms", "overhead_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise PredictionError(f"{name} must be >= 0, got {value}")
        if not self.speeds or any(not (math.isfinite(s) and s > 0) for s in self.speeds):
            raise PredictionError(f"speeds: need one factor > 0 per worker, got "
                                  f"{list(self.speeds)}")
        if self.wire_dtype not in ("float32", "float16"):
            raise PredictionError(f"wire_dtype {self.wire_dtype!r}: use float32 or float16")
        if self.max_blocks is not None and len(self.max_blocks) != len(self.speeds):
            raise PredictionError(f"max_blocks: one per worker ({len(self.speeds)}), got "
                                  f"{len(self.max_blocks)}")
        if self.chain_workers < 1:
            raise PredictionError(f"chain_workers must be >= 1, got {self.chain_workers}")
        if self.input_bytes is not None and self.input_bytes < 0:
            raise PredictionError(f"input_bytes must be >= 0, got {self.input_bytes}")

    @property
    def blocks(self) -> int:
        return len(self.block_ms)

    @property
    def wire_input_bytes(self) -> int:
        return self.activation_bytes[0] // 4 if self.input_bytes is None else self.input_bytes

    def transfer_ms(self, size: int) -> float:
        return 0.0 if math.isinf(self.link_Bps) else size / self.link_Bps * 1000


@dataclass(frozen=True)
class Prediction:
    mode: str
    images: int
    time_s: float
    """Time to infer the N images, from the first submission to the last result."""
    throughput_ips: float
    """Steady state: images per second, ``1000 / bottleneck_ms``."""
    bottleneck_ms: float
    latency_ms: float
    """One image through an idle system."""
    latency_p50_ms: float
    """Median latency (submission to result) of the N images under the window."""
    boundaries: tuple[int, ...] = ()
    """MDI: the chain's boundaries over the source and the workers."""
    chains: tuple[tuple[int, ...], ...] = ()
    """hybrid: each chain's workers (indices into ``speeds``), the chains side by side."""

    def to_dict(self) -> dict[str, object]:
        return {**({"chains": [list(c) for c in self.chains]} if self.chains else {}),
                "mode": self.mode, "images": self.images, "time_s": round(self.time_s, 4),
                "throughput_ips": round(self.images / self.time_s, 3),  # as a run measures it
                "steady_ips": round(self.throughput_ips, 3),
                "bottleneck_ms": round(self.bottleneck_ms, 3),
                "latency_ms": round(self.latency_ms, 3),
                "latency_p50_ms": round(self.latency_p50_ms, 3),
                "boundaries": list(self.boundaries)}


def predict(mode: str, scenario: Scenario, images: int, window: int = 8) -> Prediction:
    """Predict ``images`` inferences in ``mode`` with at most ``window`` in flight."""
    if images < 1:
        raise PredictionError(f"images must be >= 1, got {images}")
    if window < 1:
        raise PredictionError(f"window must be >= 1, got {window}")
    if mode == "local":
        total = math.fsum(scenario.block_ms) + scenario.overhead_ms
        return _played(mode, images, window, [(total, 0.0)], 0.0, ())
    if mode == "ddi":
        return _ddi(scenario, images, window)
    if mode in ("edgepipe", "armdi"):
        allocation = mdi_allocation(scenario)
        stages = _chain_stages(scenario, allocation)
        return _played(mode, images, window, stages, scenario.latency_ms,
                       allocation.boundaries)
    if mode == "hybrid":
        return _hybrid(scenario, images, window)
    raise PredictionError(f"mode {mode!r}: use one of {', '.join(MODES)}")


def mdi_allocation(scenario: Scenario) -> Allocation:
    """The allocator's exact optimum for one chain: the source ships the input (it runs no
    blocks), the workers run the blocks; activations as the wire carries them."""
    k = scenario.blocks
    scale = 0.5 if scenario.wire_dtype == "float16" else 1.0
    sizes = [scenario.wire_input_bytes] + [
        int(b * scale) for b in scenario.activation_bytes[1:k]] + [scenario.activation_bytes[k]]
    workers = len(scenario.speeds)
    snapshot = snapshot_from_profile(
        [scenario.block_ms] * (workers + 1), sizes, bandwidth_Bps=scenario.link_Bps,
        latency_ms=scenario.latency_ms, slowdown=[1.0, *scenario.speeds],
        max_blocks=[0, *(scenario.max_blocks or [None] * workers)])
    return solve(snapshot)


def chain_groups(max_blocks: Sequence[int | None], blocks: int,
                 chain_workers: int) -> list[tuple[int, ...]]:
    """hybrid: the workers (indices, in order) in chains of ``chain_workers``, the last one
    with what is left over; a chain whose members cannot hold all ``blocks`` between them
    (``max_blocks``, None: no cap) is left out. The runtime forms its chains with this."""
    if chain_workers < 1:
        raise PredictionError(f"chain_workers must be >= 1, got {chain_workers}")
    n = len(max_blocks)
    groups = [tuple(range(i, min(i + chain_workers, n))) for i in range(0, n, chain_workers)]
    def holds(i: int) -> int:
        cap = max_blocks[i]
        return blocks if cap is None else cap

    return [g for g in groups if sum(holds(i) for i in g) >= blocks]


def _hybrid(scenario: Scenario, images: int, window: int) -> Prediction:
    caps = scenario.max_blocks or (None,) * len(scenario.speeds)
    groups = chain_groups(caps, scenario.blocks, scenario.chain_workers)
    if not groups:
        raise PredictionError(f"hybrid: no chain of {scenario.chain_workers} worker(s) holds "
                              f"the {scenario.blocks} blocks")
    chains = []
    for g in groups:
        sub = dataclasses.replace(scenario, speeds=tuple(scenario.speeds[i] for i in g),
                                  max_blocks=tuple(caps[i] for i in g))
        chains.append(_chain_stages(sub, mdi_allocation(sub))[1:])
    head = (scenario.overhead_ms, scenario.transfer_ms(scenario.wire_input_bytes))
    return _played("hybrid", images, window, [head], scenario.latency_ms, (), chains,
                   tuple(groups))


def _chain_stages(scenario: Scenario, allocation: Allocation) -> list[tuple[float, float]]:
    """(compute ms, send ms) of each node in the chain, the source first."""
    k, b = scenario.blocks, allocation.boundaries
    scale = 0.5 if scenario.wire_dtype == "float16" else 1.0
    over = scenario.overhead_ms
    stages = [(over, scenario.transfer_ms(scenario.wire_input_bytes))]
    for n in allocation.used:
        if n == 0:
            continue
        start, end = b[n], b[n + 1]
        compute = math.fsum(scenario.block_ms[start:end]) * scenario.speeds[n - 1] + over
        size = scenario.activation_bytes[end] if end == k else int(
            scenario.activation_bytes[end] * scale)
        stages.append((compute, scenario.transfer_ms(size)))
    return stages


Stage = tuple[float, float]  # (compute ms, send ms) of one node


def _played(mode: str, images: int, window: int, stages: Sequence[Stage], latency_ms: float,
            boundaries: tuple[int, ...], chains: Sequence[Sequence[Stage]] = (),
            groups: tuple[tuple[int, ...], ...] = ()) -> Prediction:
    """Serial nodes (compute, then send, then the next request), played through: ``stages``
    one after another, then (hybrid) the one of ``chains`` that would finish it first."""
    free = [0.0] * len(stages)
    free_in = [[0.0] * len(c) for c in chains]
    done: list[float] = []
    latencies = []
    for i in range(images):
        t = submit = _slot(done, i, window)
        hops = 0
        for n, (compute, send) in enumerate(stages):
            t += latency_ms if n > 0 else 0.0
            start = max(t, free[n])
            t = free[n] = start + compute + send
        if chains:  # the chain that would finish it first (the runtime's pick)
            k = min(range(len(chains)), key=lambda c: (_through(chains[c], free_in[c], t,
                                                                 latency_ms), c))
            for n, (compute, send) in enumerate(chains[k]):
                start = max(t + latency_ms, free_in[k][n])
                t = free_in[k][n] = start + compute + send
            hops = len(chains[k])
        hops += len(stages) - 1
        t += latency_ms if hops > 0 else 0.0
        bisect.insort(done, t)
        latencies.append(t - submit)
    bottleneck = max(c + s for c, s in stages)
    idle = math.fsum(c + s for c, s in stages) + latency_ms * (len(stages) - 1)
    if chains:
        pace = 1.0 / sum(1.0 / max(max((c + s for c, s in chain), default=0.0), 1e-9)
                         for chain in chains)
        bottleneck = max(bottleneck, pace)
        idle += min(math.fsum(c + s for c, s in chain) + latency_ms * len(chain)
                    for chain in chains)
    idle += latency_ms if len(stages) > 1 or chains else 0.0
    return Prediction(mode, images, done[-1] / 1000, _rate(bottleneck), bottleneck, idle,
                      _median(latencies), boundaries, groups)


def _through(chain: Sequence[Stage], free: Sequence[float], t: float,
             latency_ms: float) -> float:
    """When a request entering ``chain`` at ``t`` would leave it (its nodes free at
    ``free``)."""
    for (compute, send), at in zip(chain, free, strict=True):
        t = max(t + latency_ms, at) + compute + send
    return t


def _ddi(scenario: Scenario, images: int, window: int) -> Prediction:
    total = math.fsum(scenario.block_ms)
    over = scenario.overhead_ms
    ship = scenario.transfer_ms(scenario.wire_input_bytes) + over  # the source's part
    back = scenario.transfer_ms(scenario.activation_bytes[-1])
    lat = scenario.latency_ms
    work = [total * s + scenario.decode_ms + over + back for s in scenario.speeds]
    free = [0.0] * len(work)
    link = 0.0
    done: list[float] = []
    latencies = []
    for i in range(images):
        submit = _slot(done, i, window)
        link = max(link, submit) + ship  # the source's one link, one input after another
        # to the worker that would finish it first (the runtime's pick), not the first free
        end, n = min((max(free[k], link + lat) + work[k], k) for k in range(len(work)))
        free[n] = end
        arrived = end + lat
        bisect.insort(done, arrived)
        latencies.append(arrived - submit)
    pace = 1.0 / sum(1.0 / max(w, 1e-9) for w in work)
    bottleneck = max(pace, ship)
    idle = ship + lat + min(work) + lat
    return Prediction("ddi", images, done[-1] / 1000, _rate(bottleneck), bottleneck, idle,
                      _median(latencies))


def _slot(done: list[float], i: int, window: int) -> float:
    """When request ``i`` may be submitted: once fewer than ``window`` are in flight
    (``done``: the completion times of requests 0..i-1, sorted)."""
    return 0.0 if i < window else done[i - window]


def _rate(bottleneck_ms: float) -> float:
    return math.inf if bottleneck_ms <= 0 else 1000.0 / bottleneck_ms


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
