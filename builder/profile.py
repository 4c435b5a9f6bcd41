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
    full: Engine,
    blocks: Sequence[Engine],
    fused: Sequence[tuple[int, int]],
    open_segment: Callable[[int, int], Engine],
    activations: Sequence[np.ndarray],
    reporter: Reporter,
    *,
    backend: str,
    threads: int,
    repeats: int = 20,
) -> DeviceProfile:
    """Median batch-1 latency of the full model, every block and the given fused segments."""
    activations = [a[:1] for a in activations]
    full_ms = median_ms(lambda: full.infer(activations[0]), repeats)
    block_ms = tuple(
        median_ms(lambda e=engine: e.infer(activations[e.start]), repeats)  # type: ignore[misc]
        for engine in reporter.track(blocks, "profile blocks")
    )
    segment_ms: dict[str, float] = {}
    for start, end in reporter.track(fused, "profile fused segments"):
        engine = open_segment(start, end)
        try:
            segment_ms[f"{start}:{end}"] = median_ms(
                lambda e=engine, x=activations[start]: e.infer(x), repeats  # type: ignore[misc]
            )
        finally:
            engine.close()
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
    full = OrtEngine(repository.check_file(manifest, manifest.full_model), 0, manifest.blocks,
                     threads=threads, providers=["CPUExecutionProvider"])
    blocks: list[Engine] = []
    try:
        for k in range(manifest.blocks):
            blocks.append(repository.open_engine(manifest, k, k + 1, backend="ort",
                                                 threads=threads, fused=True))
        x = sample_inputs(manifest.input.shape, manifest.preprocessing, count=1)
        activations = [x]
        for engine in blocks:
            x = engine.infer(x)
            activations.append(x)
        result = profile(full, blocks, [], lambda i, j: full, activations, reporter,
                         backend="ort", threads=threads, repeats=repeats)
    finally:
        for engine in (full, *blocks):
            engine.close()
    repository.save_profile(model_id, result)
    return result
