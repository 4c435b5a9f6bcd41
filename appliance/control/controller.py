"""The AR-MDI controller: neighbours move the boundary between them toward equal stage times.

Decentralised and lightweight: no central profiler runs at run time and the source is not a
planner every move passes through. Each boundary is owned by the worker on its right: every
frame it receives carries its predecessor's hop (``[a, b)`` in ``ms``) in the trace, and it
measures its own (``[b, c)``). From the two it predicts, for every boundary ``b'`` between
``a`` and ``c``, both stage times (compute plus shipping the activation on), and asks its
predecessor to end at the ``b'`` that minimises the larger one (one block or several,
whatever the gap calls for).

The prediction scales the profile (block times measured one by one at build time) by what
each side measures now: ``compute(a, b') = measured(a, b) * P(a, b') / P(a, b)``. A slowed
device, another process on it, a thermal limit or a fused segment faster than its blocks'
sum all show up as that factor; after a move the factor is measured afresh, so repeated
moves converge even where the profile is wrong.

Against oscillation and noise: each side's time is a low quantile (the 25th percentile) of
the last ``samples`` frames measured on the current split (no decision before there are
that many); a move must lower the pair's predicted bottleneck by more than ``hysteresis``
(a fraction); the boundary then stays put for ``dwell_s``. Every move must be proposed by
two windows in a row (one window can read a passing interference as a slowed device); a small
gain (below ``big``) moves one block toward the best boundary (the prediction's error near
balance is as large as the gain) and waits out the dwell, which a move back the way the last
one came doubles (up to ``max_dwell_s``; only a big gain resets it). A step must gain enough
by itself, except over a block that costs almost nothing (gains less than ``hysteresis``),
where the best boundary's gain carries it: such blocks can lie between a split and balance.
Noise that makes a boundary hop to and fro soon stops moving it, while a real change (a
device 4x slower: a big gain) moves it at the next window.

``propose`` is the pure decision; ``BoundaryController`` keeps the estimates and the clock.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["BoundaryController", "ControllerSettings", "Move", "propose", "should_rebalance",
           "step_toward", "transfer_ms"]


NOISE_WEIGHT = 0.2
"""The weight of the newest pair of windows in the controller's running noise estimate."""
NOISE_MARGIN = 3.0
"""A small move must gain more than this many times the mean relative difference of two
readings of one split. Its gain compares two readings (here now, the other split predicted
from now or measured seconds ago), each as noisy as any reading: a margin of 3 asks for about
two standard deviations of that difference. Measured on the homogeneous pair of ``armdi bench
adaptive`` (2-core VM, real compute): margin 2 left 1-3 moves per 30 s at rest between two
equivalent splits, margin 3 none in three runs."""


@dataclass(frozen=True)
class ControllerSettings:
    hysteresis: float = 0.02
    """Move only when the pair's predicted bottleneck is this fraction below the measured."""
    dwell_s: float = 1.0
    """At least this long between two moves of one boundary."""
    samples: int = 16
    """Frames measured on a split before it is judged (each side: a low quantile of them)."""
    big: float = 0.25
    """A gain this large (a fraction of the bottleneck) is acted on at once."""
    max_dwell_s: float = 240.0
    """The longest the dwell grows to after moves that undo each other. A chain can cycle
    between two splits with the same bottleneck, each move justified by what its pair sees
    (a boundary's move changes its neighbours' pairs, which then forget what they measured):
    on a 4-worker chain with a wrong profile the property test found a cycle of three moves
    each way, each boundary moving once per dwell; at 60 s that was 1.5 moves per 30 s for
    the chain, at 240 s it is under 0.4. A gain over ``big`` does not wait for it."""
    memory_s: float = 10.0
    """How long a split's measured bottleneck is remembered (and preferred to the
    prediction): comparing it with one measured much later compares two moments of the
    machine as much as two splits."""
    quantile: float = 0.25
    """Each side's time is this quantile of its samples: interference (another process on
    the core, a scheduling hiccup) only ever adds time, so a low quantile tracks what the
    device does when it runs, and noise moves it far less than it moves the median; a device
    that really slows down moves every sample, and the quantile with them."""


@dataclass(frozen=True)
class Move:
    """A proposed boundary and what it is predicted to give."""

    boundary: int
    left_ms: float  # predicted stage times after the move
    right_ms: float
    before_ms: float  # the pair's bottleneck as measured now

    @property
    def after_ms(self) -> float:
        return max(self.left_ms, self.right_ms)

    def describe(self, left: str, right: str, old: int) -> str:
        return (f"{left} | {right}: boundary {old} -> {self.boundary}, pair bottleneck "
                f"{self.before_ms:.2f} -> {self.after_ms:.2f} ms (predicted {left} "
                f"{self.left_ms:.2f} ms, {right} {self.right_ms:.2f} ms)")


def _scaled(prefix: Sequence[float], measured_ms: float, start: int, end: int
            ) -> Callable[[int, int], float]:
    """``(i, j) -> predicted ms`` of blocks ``[i, j)`` on a device that measured
    ``measured_ms`` for ``[start, end)``: the profile scaled by measured / profiled."""
    profiled = prefix[end] - prefix[start]
    per_block = measured_ms / max(end - start, 1)
    if profiled <= 0.0:  # a profile of zeros: spread the measured time evenly over blocks
        return lambda i, j: per_block * (j - i)
    factor = measured_ms / profiled
    return lambda i, j: factor * (prefix[j] - prefix[i])


def _check(left: tuple[int, int], right: tuple[int, int],
           left_transfer_ms: Sequence[float]) -> None:
    (a, b), (b2, c) = left, right
    if b != b2 or not a < b < c:
        raise ValueError(f"segments [{a}, {b}) and [{b2}, {c}) are not two non-empty "
                         "neighbours")
    if len(left_transfer_ms) < c + 1:
        raise ValueError(f"left_transfer_ms needs an entry per boundary up to {c}")


def _predictor(block_ms: Sequence[float], left: tuple[int, int], left_ms: float,
               right: tuple[int, int], right_ms: float, left_transfer_ms: Sequence[float],
               right_transfer_ms: float, measured: Mapping[int, float] | None
               ) -> Callable[[int], Move]:
    """``k -> Move``: both stage times predicted for the boundary at ``k`` (see propose)."""
    (a, b), (_b, c) = left, right
    prefix = [0.0]
    for t in block_ms:
        prefix.append(prefix[-1] + max(0.0, t))
    left_of = _scaled(prefix, left_ms, a, b)
    right_of = _scaled(prefix, right_ms, b, c)
    before = max(left_ms + left_transfer_ms[b], right_ms + right_transfer_ms)
    known = measured or {}

    def predict(k: int) -> Move:
        if k in known and k != b:  # tried before: the measurement, not the model
            return Move(k, known[k], known[k], before)
        return Move(k, left_of(a, k) + left_transfer_ms[k], right_of(k, c) + right_transfer_ms,
                    before)

    return predict


def propose(block_ms: Sequence[float], left: tuple[int, int], left_ms: float,
            right: tuple[int, int], right_ms: float, left_transfer_ms: Sequence[float],
            right_transfer_ms: float, hysteresis: float,
            measured: Mapping[int, float] | None = None,
            max_step: int | None = None) -> Move | None:
    """The boundary between two neighbours that minimises their larger stage time, or None
    when no boundary beats the current one by more than ``hysteresis``.

    ``left = (a, b)`` and ``right = (b, c)`` are the two segments, measured at ``left_ms``
    and ``right_ms`` of compute; ``left_transfer_ms[k]`` is what shipping the activation at
    boundary ``k`` costs the left side, ``right_transfer_ms`` what the right side's output
    costs it (it does not change with ``b``). Both sides keep at least one block. Among equal
    predictions the boundary nearest the current one wins (fewest blocks moved).

    ``measured[k]``: the pair's bottleneck as measured when the boundary was at ``k`` (same
    outer ends). Where known it replaces the prediction, so a boundary that was tried and
    found no better is not tried again: the profile can be wrong (fused segments run faster
    than their blocks' sum), and predictions alone may send a boundary to and fro forever.

    ``max_step``: consider only boundaries at most this many blocks from the current one.
    """
    _check(left, right, left_transfer_ms)
    (a, b), (_b, c) = left, right
    predict = _predictor(block_ms, left, left_ms, right, right_ms, left_transfer_ms,
                         right_transfer_ms, measured)
    best: Move | None = None
    lo, hi = a + 1, c
    if max_step is not None:
        lo, hi = max(lo, b - max_step), min(hi, b + max_step + 1)
    for k in range(lo, hi):
        move = predict(k)
        if best is None or _rank(move, b) < _rank(best, b):
            best = move
    # 1e-9: sums of the same times in another order differ in the last bits; without it, equal
    # splits would look better than each other and a boundary could hop between them forever
    if best is None or best.boundary == b or not best.after_ms < best.before_ms * (
            1.0 - hysteresis - 1e-9):
        return None
    return best


def step_toward(block_ms: Sequence[float], left: tuple[int, int], left_ms: float,
                right: tuple[int, int], right_ms: float, left_transfer_ms: Sequence[float],
                right_transfer_ms: float, target: int,
                measured: Mapping[int, float] | None = None) -> Move | None:
    """One block from the current boundary toward ``target`` (a boundary ``propose`` found
    better), or None when that step alone is predicted worse than staying.

    Between a split and the best one there are often blocks that cost almost nothing (a
    cheap block moved gains less than any hysteresis), so judging each single step on its own
    gain can stall a boundary on a plateau short of balance; the target's gain is what
    justifies the walk, and each step is measured before the next."""
    _check(left, right, left_transfer_ms)
    b = left[1]
    if target == b:
        return None
    predict = _predictor(block_ms, left, left_ms, right, right_ms, left_transfer_ms,
                         right_transfer_ms, measured)
    move = predict(b + (1 if target > b else -1))
    return move if move.after_ms <= move.before_ms * (1.0 + 1e-9) else None


def _low(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``samples`` (0.0 when there are none)."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def _rank(move: Move, current: int) -> tuple[float, float, int]:
    """Lower is better: the pair's bottleneck, then the gap between the two stages (a
    balanced pair leaves its neighbours room to shed blocks), then the blocks moved."""
    return (move.after_ms, abs(move.left_ms - move.right_ms), abs(move.boundary - current))


class BoundaryController:
    """One boundary's controller, on the worker to its right: the last ``samples`` compute
    times of both sides on the current split, the dwell clock, and ``propose``."""

    def __init__(self, block_ms: Sequence[float], settings: ControllerSettings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.block_ms = tuple(block_ms)
        self.settings = settings or ControllerSettings()
        self.clock = clock
        self.left: tuple[int, int] | None = None
        self.right: tuple[int, int] | None = None
        self._left_ms: deque[float] = deque(maxlen=self.settings.samples)
        self._right_ms: deque[float] = deque(maxlen=self.settings.samples)
        self.count = 0
        self.last_move = -math.inf
        self.dwell_s = self.settings.dwell_s
        self._direction = 0  # of the last move: -1 left, +1 right
        self._seen: int | None = None  # a small move's direction, proposed once already
        self._proposed: Move | None = None
        self._expected: float | None = None  # the bottleneck the last move predicted
        self._retry_at = -math.inf  # after a refused move, not before this
        self._proposed_from = 0  # the boundary the proposed move leaves
        # the pair's measured bottleneck by boundary, for the current outer ends (a, c)
        self._tried: dict[int, tuple[float, float]] = {}  # boundary -> (ms, when measured)
        self._ends: tuple[int, int] | None = None
        self.noise: float | None = None  # mean relative difference of two readings of a split

    @property
    def left_ms(self) -> float:
        return _low(self._left_ms, self.settings.quantile)

    @property
    def right_ms(self) -> float:
        return _low(self._right_ms, self.settings.quantile)

    def observe(self, left: tuple[int, int], left_ms: float, right: tuple[int, int],
                right_ms: float) -> None:
        """One frame's measurements: the predecessor ran ``left`` in ``left_ms``, this node
        ``right`` in ``right_ms``."""
        if left != self.left or right != self.right:
            self.left, self.right = left, right
            self._left_ms.clear()
            self._right_ms.clear()
            self.count = 0
        self._left_ms.append(left_ms)
        self._right_ms.append(right_ms)
        self.count += 1

    def decide(self, left_transfer_ms: Sequence[float], right_transfer_ms: float) -> Move | None:
        """A move to make now, or None (too soon, too few samples, or nothing pays)."""
        s = self.settings
        now = self.clock()
        if (self.left is None or self.right is None or self.count < s.samples
                or now - self.last_move < s.dwell_s or now < self._retry_at
                or not self.left[0] < self.left[1] < self.right[1]):
            return None
        ends = (self.left[0], self.right[1])
        if ends != self._ends:  # a neighbour's other boundary moved: old facts do not apply
            self._ends, self._tried = ends, {}
        here = max(self.left_ms + left_transfer_ms[self.left[1]],
                   self.right_ms + right_transfer_ms)
        # remembered longer while moves keep undoing each other (the dwell has grown): there
        # the prediction is what is wrong, and forgetting the measurement reopens the to-and-fro
        keep_s = max(s.memory_s, 2.0 * self.dwell_s)
        # (measured too long ago: the machine has changed since)
        self._tried = {k: (ms, at) for k, (ms, at) in self._tried.items() if now - at <= keep_s}
        before = self._tried[self.left[1]][0] if self.left[1] in self._tried else None
        if before is not None:
            # how much two readings of this split differ (the window before, or the last visit
            # seconds ago), on average: the measurement's own noise, drift included; a jump
            # over ``big`` is a device that changed, not noise
            jump = abs(here - before) / max(here, before, 1e-12)
            if jump < s.big:
                self.noise = jump if self.noise is None else (
                    NOISE_WEIGHT * jump + (1.0 - NOISE_WEIGHT) * self.noise)
        noise = NOISE_MARGIN * (self.noise or 0.0)
        # what this boundary measured before, or what the move here predicted it would
        past = before if before is not None else self._expected
        self._expected = None
        if past is not None and abs(here - past) > s.big * past:
            self._tried = {}  # conditions changed (a device slowed or sped up): start afresh
        self._tried[self.left[1]] = (here, now)
        measured = {k: ms for k, (ms, _at) in self._tried.items()}
        move = propose(self.block_ms, self.left, self.left_ms, self.right, self.right_ms,
                       left_transfer_ms, right_transfer_ms, s.hysteresis, measured)
        if move is None:
            self._seen = None
            return None
        gain = 1.0 - move.after_ms / move.before_ms if move.before_ms > 0 else 0.0
        if gain < s.big:
            # Near balance the prediction's error (a profile that misjudges fused segments,
            # interference that differs from one window to the next) is as large as the gain:
            # one block at a time toward the best boundary, each step measured before the next.
            move = step_toward(self.block_ms, self.left, self.left_ms, self.right,
                               self.right_ms, left_transfer_ms, right_transfer_ms,
                               move.boundary, measured)
            if move is None:
                self._seen = None
                return None
            step_gain = 1.0 - move.after_ms / move.before_ms if move.before_ms > 0 else 0.0
            if step_gain >= s.hysteresis:
                # a step that moves real work must pay for itself (against the noise below);
                # only a block that costs almost nothing is carried by the best boundary's gain
                # (a walk over blocks that each gain nothing, and each step costs nothing)
                gain = step_gain
        direction = 1 if move.boundary > self.left[1] else -1
        if self._seen != direction:
            # a second window must agree: on a shared machine one window in a few hundred
            # reads 30-60 % slow on one side (another process took the core), which looks
            # just like a device that slowed down, except that it is gone by the next window
            self._seen = direction
            self._left_ms.clear()
            self._right_ms.clear()
            self.count = 0
            return None
        if gain < s.big and gain <= noise:
            # within what two windows on one split differ by: on a busy machine (2 cores
            # shared by the source and two workers, each window's low quantile swinging by
            # 5-30 %) such moves go to and fro one block at a time and gain nothing
            return None
        if gain < s.big and now - self.last_move < self.dwell_s:
            return None  # a small gain: only after the dwell, grown by reversals
        self._proposed, self._proposed_from = move, self.left[1]
        return move

    def refused(self, pause_s: float = 0.2) -> None:
        """The predecessor refused the proposed move (its range changed meanwhile, e.g. its
        other boundary moved): judge afresh on fresh samples after ``pause_s``; nothing moved,
        so no new dwell (the last real move's still holds)."""
        self._proposed = None
        self._retry_at = self.clock() + pause_s  # the last real move's dwell still holds
        self.left = self.right = None
        self._left_ms.clear()
        self._right_ms.clear()
        self.count = 0
        self._seen = None

    def moved(self) -> None:
        """The proposed move was made (or failed): start the dwell, judge the new split on
        fresh samples; a move that undoes the last one doubles the dwell."""
        move, self._proposed = self._proposed, None
        self._expected = move.after_ms if move is not None else None
        if move is not None:
            # from what decide saw: frames on the new split may already have been observed
            direction = 1 if move.boundary > self._proposed_from else -1
            gain = 1.0 - move.after_ms / move.before_ms if move.before_ms > 0 else 0.0
            if direction == -self._direction:  # undoing the last move: noise or a wrong
                # profile, likely, even when it was predicted to gain much
                self.dwell_s = min(self.dwell_s * 2, self.settings.max_dwell_s)
            elif gain >= self.settings.big:  # a real change: act on the next one promptly
                self.dwell_s = self.settings.dwell_s
            # a small step on in the same direction keeps the dwell as it is
            self._direction = direction
        self.last_move = self.clock()
        self.left = self.right = None
        self._left_ms.clear()
        self._right_ms.clear()
        self.count = 0
        self._seen = None


def should_rebalance(measured_ms: float, optimum_ms: float, big: float) -> bool:
    """Whether the chain's measured bottleneck is so far above the exact optimum (at the
    measured speeds) that the source should place the boundaries there at once.

    Pairwise moves can stall where only a cascade helps (a slow device can shed a block only
    after its neighbour sheds one to a faster device further up the chain); the source, which
    sees every hop in the results' traces, corrects such a chain in one step. It is rare by
    design: only for a gain above ``big``."""
    return optimum_ms > 0 and measured_ms > optimum_ms * (1.0 + big)


def transfer_ms(activation_bytes: Sequence[int], rate_Bps: float | None,
                latency_ms: float) -> list[float]:
    """Per boundary, what shipping its activation costs over a link (``None``: free)."""
    if rate_Bps is None or math.isinf(rate_Bps):
        return [latency_ms] * len(activation_bytes)
    return [size / rate_Bps * 1000.0 + latency_ms for size in activation_bytes]
