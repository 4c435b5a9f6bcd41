"""Latency profile of a model's blocks and segments on this device."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

import numpy as np

from builder.progress import Reporter
from engines.base import Engine
from engines.device import device_signature
from engines.manifest import DeviceProfile
from engines.repository import ModelRepository

__all__ = ["device_signature", "median_ms", "profile", "profile_installed", "sample_segments"]


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


def profile_installed(repository: ModelRepository, model_id: str, reporter: Reporter, *,
                      threads: int = 1, repeats: int = 20) -> DeviceProfile:
    """Profile a model already in ``repository`` on this device with ONNX Runtime (the full
    model and every block; no torch needed) and save it in the manifest for the allocator."""
    from builder.verify import sample_inputs
    from engines.ort import OrtEngine

    manifest = repository.load_manifest(model_id)
    repository.check_file(manifest, manifest.weights_file)

    def open_full() -> Engine:
        return OrtEngine(repository.check_file(manifest, manifest.full_model), 0,
                         manifest.blocks, threads=threads, providers=["CPUExecutionProvider"])

    def open_segment(start: int, end: int) -> Engine:
        return repository.open_engine(manifest, start, end, backend="ort", threads=threads,
                                      fused=True)

    x = sample_inputs(manifest.input.shape, manifest.preprocessing, count=1)
    activations = [x]
    for k in range(manifest.blocks):  # one engine open at a time: bounded memory
        engine = open_segment(k, k + 1)
        try:
            x = engine.infer(x)
        finally:
            engine.close()
        activations.append(x)
    result = profile(open_full, open_segment, manifest.blocks, [], activations, reporter,
                     backend="ort", threads=threads, repeats=repeats)
    repository.save_profile(model_id, result)
    return result
