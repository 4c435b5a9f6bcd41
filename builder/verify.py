"""Verification: chained block engines and every fused segment equal the full model."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from builder.progress import Reporter
from engines.base import Engine
from engines.errors import VerificationError
from engines.manifest import Preprocessing, Verification
from engines.preprocess import preprocess

FP32_TOLERANCE = 1e-4


def sample_inputs(shape: tuple[int, ...], prep: Preprocessing, count: int = 4,
                  seed: int = 0) -> np.ndarray:
    """Sample photos (scikit-image's, where installed) then seeded random inputs."""
    rng = np.random.default_rng(seed)
    samples: list[np.ndarray] = []
    if len(shape) == 4 and shape[1] == 3 and shape[2] == shape[3] == prep.crop:
        try:
            import skimage.data

            for name in ("chelsea", "coffee", "rocket", "astronaut"):
                samples.append(preprocess(getattr(skimage.data, name)(), prep)[0])
        except ImportError:
            pass
    while len(samples) < count:
        samples.append(rng.standard_normal(shape[1:]).astype(np.float32))
    return np.stack(samples[:count])


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def verify(
    full: Engine,
    blocks: Sequence[Engine],
    fused: Sequence[tuple[int, int]],
    open_segment: Callable[[int, int], Engine],
    inputs: np.ndarray,
    reporter: Reporter,
    tolerance: float = FP32_TOLERANCE,
) -> tuple[Verification, list[np.ndarray]]:
    """Run the full model, the chain of blocks, and each fused segment on the block chain's
    activations; raise ``VerificationError`` if any output departs by more than ``tolerance``.

    Fused segments are opened one at a time (``open_segment``) and closed after their check,
    so a model with hundreds of segments never holds them all in memory. Samples run one at a
    time so no segment needs a dynamic batch to be verified. Returns the result and the block
    chain's activations at every boundary."""
    reference = np.concatenate([full.infer(x[None]) for x in inputs])
    activations = [inputs]
    x = inputs
    for engine in reporter.track(blocks, "verify block chain"):
        x = np.concatenate([engine.infer(s[None]) for s in x])
        activations.append(x)
    worst = _max_abs(reference, x)
    worst_where = "block chain"
    agree = float(np.mean(reference.reshape(len(inputs), -1).argmax(1)
                          == x.reshape(len(inputs), -1).argmax(1)))
    for start, end in reporter.track(fused, "verify fused segments"):
        engine = open_segment(start, end)
        try:
            err = _max_abs(engine.infer(activations[start][:1]), activations[end][:1])
        finally:
            engine.close()
        if err > worst:
            worst, worst_where = err, f"segment [{start},{end})"
    passed = worst <= tolerance and agree == 1.0
    result = Verification(
        passed=passed, max_abs_error=worst, tolerance=tolerance, samples=len(inputs),
        top1_agreement=agree, segments_checked=len(blocks) + len(fused),
        detail=f"largest error in {worst_where}",
    )
    if not passed:
        raise VerificationError(
            f"verification failed: max abs error {worst:.3g} in {worst_where} "
            f"(tolerance {tolerance:g}), top-1 agreement {agree:.0%}"
        )
    return result, activations
