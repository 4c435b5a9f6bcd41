"""Failure detection that tells slow from dead: phi-accrual over heartbeat arrivals.

Every worker sends a heartbeat every ``interval_ms`` from a thread of its own, whatever its
engine is doing, so a worker that computes slowly (an 8x slowdown, a throttled Jetson) keeps
its heartbeats regular: it is *slow*, and the adaptive controller takes blocks from it. A
worker whose heartbeats stop is *dead* once the silence is improbable given the intervals
seen so far (Hayashibara et al.'s phi-accrual detector)::

    phi(t) = -log10(P(an interval longer than t)),  intervals ~ Normal(mean, std)

with ``std`` at least ``min_std_ms`` (a very regular sender would otherwise be declared dead
on its first late beat) and ``acceptable_pause_ms`` of slack added to the mean (garbage
collection, a busy scheduler). With the defaults (100 ms beats, phi 8, 50 ms std, 100 ms
slack) a silent worker is declared dead about 0.5 s after its last beat.

phi alone adapts to the history, and a history with a few long gaps in it (a busy machine, a
worker that was loading engines, a source that was busy itself) inflates ``std`` enough that a
worker paused for seconds is not declared dead before it resumes. So silence longer than
``max_silence_ms`` is death whatever phi says: the ceiling of the adaptive threshold.

Everything here is a pure function of the arrival times it is given; the source feeds it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["DetectorSettings", "PhiAccrual", "phi"]


@dataclass(frozen=True)
class DetectorSettings:
    interval_ms: float = 100.0
    """How often workers send a heartbeat."""
    phi_threshold: float = 8.0
    """Declared dead above this (10^-8: one false alarm in 10^8 intervals, if normal)."""
    min_std_ms: float = 50.0
    acceptable_pause_ms: float = 100.0
    window: int = 100
    """Intervals remembered per worker."""
    max_silence_ms: float = 2000.0
    """Dead after this much silence whatever phi says (the adaptive threshold's ceiling)."""


def phi(elapsed_ms: float, mean_ms: float, std_ms: float) -> float:
    """-log10 of the probability that an interval lasts longer than ``elapsed_ms``."""
    if std_ms <= 0:
        raise ValueError("std_ms must be positive")
    z = (elapsed_ms - mean_ms) / (std_ms * math.sqrt(2.0))
    tail = 0.5 * math.erfc(z)  # P(X > elapsed)
    return math.inf if tail <= 0.0 else -math.log10(tail)


class PhiAccrual:
    """One worker's heartbeat history (times in seconds, from any monotonic clock)."""

    def __init__(self, settings: DetectorSettings | None = None) -> None:
        self.settings = settings or DetectorSettings()
        self._intervals: deque[float] = deque(maxlen=self.settings.window)
        self.last: float | None = None
        self.armed: float | None = None  # beats expected from then on (see ``expect``)

    def heartbeat(self, now: float) -> None:
        if self.last is not None and now > self.last:
            self._intervals.append((now - self.last) * 1000.0)
        self.last = now

    def phi(self, now: float) -> float:
        """How suspicious the silence since the last heartbeat is (0 before the first)."""
        if self.last is None:
            return 0.0
        s = self.settings
        if self._intervals:
            mean = sum(self._intervals) / len(self._intervals)
            var = sum((x - mean) ** 2 for x in self._intervals) / len(self._intervals)
            std = max(math.sqrt(var), s.min_std_ms)
        else:  # one beat so far: assume the configured interval
            mean, std = s.interval_ms, s.min_std_ms
        return phi((now - self.last) * 1000.0, mean + s.acceptable_pause_ms, std)

    def expect(self, now: float) -> None:
        """Heartbeats are due from ``now`` on (the worker was given work): one that never
        beats at all is then dead after ``max_silence_ms`` too (phi needs a first beat)."""
        if self.armed is None:
            self.armed = now

    def silence_ms(self, now: float) -> float:
        """How long since the last heartbeat, or since beats were expected (0 before)."""
        since = self.last if self.last is not None else self.armed
        return 0.0 if since is None else (now - since) * 1000.0

    def dead(self, now: float) -> bool:
        return (self.silence_ms(now) > self.settings.max_silence_ms
                or self.phi(now) > self.settings.phi_threshold)

    def reset(self) -> None:
        """Forget the history (a worker that rejoins starts afresh)."""
        self._intervals.clear()
        self.last = self.armed = None
