"""Verification: chained block engines and every fused segment equal the full model.

Errors are judged against the output's own scale. An absolute tolerance says nothing about a
model whose outputs are tiny: torchvision's ``mobilenet_v2`` with random weights gives
logits of order 1e-9, because Kaiming init with ``mode="fan_out"`` counts every output
channel of a depthwise convolution as fan-out (so each one shrinks the signal by about
``sqrt(C / 2)``), batch norm at its initial statistics is the identity in eval mode, and
only the residual blocks carry the scale across. No input fixes that: with zero biases and
ReLU the network is positively homogeneous (twice the input, twice the logits) until ReLU6
clips. Relative measures are scale-free, so the check can fail for every model.

Engines are opened one at a time and closed after use: the full model for the reference,
then each block in turn, then each fused segment. Only the first sample's activation at
each cut is kept (to feed fused segments, TensorRT and the profile), so the peak is about one
engine plus one model's worth of sample-0 activations, whatever the number of segments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from builder.memory import MemoryBudget
from builder.progress import Reporter
from engines.base import Engine
from engines.errors import VerificationError
from engines.manifest import Preprocessing, Verification
from engines.preprocess import preprocess

RELATIVE_TOLERANCE = 1e-4  # max abs error / max abs reference, per compared tensor
MIN_COSINE = 0.9999  # smallest cosine similarity of one sample's output with the reference
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")


@dataclass(frozen=True)
class Comparison:
    """How far ``candidate`` is from ``reference``, absolutely and on the reference's scale."""

    max_abs_error: float
    scale: float  # max abs of the reference
    relative_error: float  # max_abs_error / scale (0 if both are all zero)
    cosine: float  # smallest per-sample cosine similarity

    def passes(self, tolerance: float) -> bool:
        return self.relative_error <= tolerance and self.cosine >= MIN_COSINE


def compare(reference: np.ndarray, candidate: np.ndarray) -> Comparison:
    if reference.shape != candidate.shape:
        return Comparison(float("inf"), 0.0, float("inf"), -1.0)
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    got = candidate.astype(np.float64).reshape(len(candidate), -1)
    err = float(np.max(np.abs(ref - got))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    if not np.isfinite(err):
        relative = float("inf")
    elif scale > 0:
        relative = err / scale
    else:
        relative = 0.0 if err == 0 else float("inf")
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    dots = np.sum(ref * got, axis=1)
    both_zero = (np.linalg.norm(ref, axis=1) == 0) & (np.linalg.norm(got, axis=1) == 0)
    cosines = np.where(both_zero, 1.0, dots / np.where(norms > 0, norms, 1.0))
    cosine = float(np.min(cosines)) if cosines.size else 1.0
    return Comparison(err, scale, relative, cosine if np.isfinite(cosine) else -1.0)


def top1_agreement(reference: np.ndarray, candidate: np.ndarray,
                   tolerance: float) -> tuple[float, int]:
    """Share of samples with the same top-1, counting only samples whose reference top-1
    leads the runner-up by more than the tolerance (ties within rounding decide nothing);
    returns the share and the number of samples counted."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    got = candidate.reshape(len(candidate), -1).astype(np.float64)
    if ref.shape[1] < 2:
        return 1.0, 0
    top2 = np.sort(ref, axis=1)[:, -2:]
    scale = float(np.max(np.abs(ref))) or 1.0
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * tolerance * scale
    if not decisive.any():
        return 1.0, 0
    same = ref.argmax(1) == got.argmax(1)
    return float(np.mean(same[decisive])), int(decisive.sum())


def sample_inputs(shape: tuple[int, ...], prep: Preprocessing, count: int = 8,
                  seed: int = 0) -> np.ndarray:
    """Sample photos (scikit-image's, where installed) then seeded random inputs.

    Photos alone can be a weak test for a model with random weights: it may give all of
    them the same top-1. Seeded noise in the normalised input space (what ``preprocess``
    produces: mean 0, unit variance per channel) makes the outputs differ between samples,
    so a chain that ignored its input would not agree with the reference."""
    rng = np.random.default_rng(seed)
    samples: list[np.ndarray] = []
    if (len(shape) == 4 and shape[1] == 3 and shape[2] == prep.crop
            and shape[3] == (prep.crop_width or prep.crop)):
        try:
            import skimage.data

            for name in PHOTOS[:count]:
                samples.append(preprocess(getattr(skimage.data, name)(), prep)[0])
        except ImportError:
            pass
    while len(samples) < count:
        samples.append(rng.standard_normal(shape[1:]).astype(np.float32))
    return np.stack(samples[:count])


def _run(engine: Engine, batch: np.ndarray) -> np.ndarray:
    """One sample at a time: no segment needs a dynamic batch to be verified."""
    return np.concatenate([engine.infer(sample[None]) for sample in batch])


def verify(
    open_full: Callable[[], Engine],
    open_segment: Callable[[int, int], Engine],
    blocks: int,
    fused: Sequence[tuple[int, int]],
    inputs: np.ndarray,
    reporter: Reporter,
    *,
    tolerance: float = RELATIVE_TOLERANCE,
    budget: MemoryBudget | None = None,
) -> tuple[Verification, list[np.ndarray]]:
    """Run the full model, the chain of blocks, and each fused segment on the block chain's
    activations; raise ``VerificationError`` if an output departs from its reference by more
    than ``tolerance`` of the reference's scale, or the chain changes a decisive top-1.

    Returns the result and the chain's activations at every cut: all samples at the input
    and the output, the first sample at the cuts in between."""
    budget = budget or MemoryBudget()
    full = open_full()
    try:
        reference = _run(full, inputs)
    finally:
        full.close()
    budget.check("running the full model")
    activations = [inputs]
    x = inputs
    for k in reporter.track(range(blocks), "verify block chain"):
        engine = open_segment(k, k + 1)
        try:
            x = _run(engine, x)
        finally:
            engine.close()
        budget.check(f"verifying block {k}")
        activations.append(x if k == blocks - 1 else x[:1].copy())
    chain = compare(reference, x)
    agree, decisive = top1_agreement(reference, x, tolerance)
    worst, worst_where = chain, "the block chain"
    min_cosine = chain.cosine
    largest_abs = chain.max_abs_error
    for start, end in reporter.track(fused, "verify fused segments"):
        engine = open_segment(start, end)
        try:
            result = compare(activations[end][:1], engine.infer(activations[start][:1]))
        finally:
            engine.close()
        budget.check(f"verifying segment [{start},{end})")
        largest_abs = max(largest_abs, result.max_abs_error)
        min_cosine = min(min_cosine, result.cosine)
        if (worst.passes(tolerance) and not result.passes(tolerance)) \
                or result.relative_error > worst.relative_error:
            worst, worst_where = result, f"segment [{start},{end})"
    passed = worst.passes(tolerance) and min_cosine >= MIN_COSINE and agree == 1.0
    spread = float(np.max(np.abs(reference - reference.mean(0)))) / chain.scale \
        if chain.scale > 0 and len(reference) > 1 else 0.0
    summary = (f"largest relative error {worst.relative_error:.3g} in {worst_where} "
               f"(max abs error {worst.max_abs_error:.3g} against a scale of "
               f"{worst.scale:.3g}, cosine {worst.cosine:.6f}); output scale "
               f"{chain.scale:.3g}, spread between samples {spread:.3g}; top-1 agreement on "
               f"{decisive} decisive samples of {len(inputs)}")
    result_record = Verification(
        passed=passed, max_abs_error=largest_abs, tolerance=tolerance, samples=len(inputs),
        top1_agreement=agree, segments_checked=blocks + len(fused), detail=summary,
        max_relative_error=worst.relative_error, min_cosine=min_cosine,
    )
    if not passed:
        raise VerificationError(
            f"verification failed: relative error {worst.relative_error:.3g} in {worst_where} "
            f"(tolerance {tolerance:g} of the output's scale {worst.scale:.3g}; cosine "
            f"{worst.cosine:.6f}), top-1 agreement {agree:.0%}. The segment files do not "
            "compute what the model computes: report it with the model file")
    return result_record, activations
