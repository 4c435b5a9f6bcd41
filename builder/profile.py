"""Latency profile of a model's blocks and segments on this device."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

import numpy as np

from builder.progress import Reporter
from engines.base import Engine
from engines.manifest import DeviceProfile


def device_signature() -> str:
    """A stable name for this kind of device: architecture, CPU model, core count."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware")):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = re.sub(r"[^A-Za-z0-9]+", "-", cpu).strip("-")[:48] or "cpu"
    return f"{platform.machine()}-{cpu}-{os.cpu_count()}c"


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def sample_segments(candidates: Sequence[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """An even spread of fused segments (j - i >= 2) of every length, at most ``limit``."""
    multi = sorted((s for s in candidates if s[1] - s[0] >= 2), key=lambda s: (s[1] - s[0], s))
    if len(multi) <= limit:
        return multi
    step = len(multi) / limit
    return [multi[int(i * step)] for i in range(limit)]


def profile(
    open_full: Callable[[], Engine],
    open_segment: Callable[[int, int], Engine],
    blocks: int,
    fused: Sequence[tuple[int, int]],
    activations: Sequence[np.ndarray],
    reporter: Reporter,
    *,
    backend: str,
    threads: int,
    repeats: int = 20,
) -> DeviceProfile:
    """Median batch-1 latency of the full model, every block and the given fused segments.

    One engine is open at a time, so the memory held is that of the largest one."""
    activations = [a[:1] for a in activations]

    def timed(engine: Engine, x: np.ndarray) -> float:
        try:
            return median_ms(lambda: engine.infer(x), repeats)
        finally:
            engine.close()

    full_ms = timed(open_full(), activations[0])
    block_ms = tuple(timed(open_segment(k, k + 1), activations[k])
                     for k in reporter.track(range(blocks), "profile blocks"))
    segment_ms = {f"{start}:{end}": timed(open_segment(start, end), activations[start])
                  for start, end in reporter.track(fused, "profile fused segments")}
    return DeviceProfile(
        device=device_signature(), backend=backend, threads=threads, repeats=repeats,
        full_model_ms=full_ms, block_ms=block_ms, segment_ms=segment_ms,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
