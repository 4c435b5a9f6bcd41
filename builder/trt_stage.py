"""The TensorRT stage of ``armdi build``: an engine per segment, verified against ONNX Runtime.

Engines are built into ``<repo>/.trt-cache`` (keyed by model, segment, TensorRT version,
GPU, precision and profile, with one timing cache per device) and linked into the model
directory, so a rebuild of the same model on the same device reuses them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from builder.progress import Reporter
from builder.segments import segment_filename
from engines.manifest import SegmentEntry, Verification

TRT_CACHE = ".trt-cache"


def require_tensorrt() -> int:
    """TensorRT's major version, or ``BackendUnavailableError`` saying what to do."""
    from engines.trt import import_tensorrt, parse_trt_version

    return parse_trt_version(str(import_tensorrt().__version__))[0]


def build_trt(
    out: Path,
    repo_root: Path,
    ranges: Sequence[tuple[int, int]],
    fingerprint: str,
    activations: Sequence[np.ndarray],
    open_ort: Callable[[int, int], object],
    reporter: Reporter,
    *,
    fp16: bool,
    blocks: int,
) -> tuple[list[SegmentEntry], float]:
    """Build, link and verify a TensorRT engine per segment; returns the entries and the
    largest error against ONNX Runtime."""
    require_tensorrt()
    from builder.trt_build import TrtBuilder, TrtBuildOptions, timing_cache_path, verify_against
    from engines.trt import TrtSession, open_engine

    session = TrtSession.start()
    # Pre-flight: say which ops this TensorRT cannot import before minutes of builds.
    import onnx

    from builder.trt_build import check_ops
    from engines.errors import BuildError

    problems = check_ops(onnx.load(str(out / "model.onnx"), load_external_data=False),
                         session.device.trt_version)
    if problems:
        session.close()
        raise BuildError(f"TensorRT {session.device.trt_version} cannot build this model: "
                         + "; ".join(problems))
    cache = repo_root / TRT_CACHE
    cache.mkdir(parents=True, exist_ok=True)
    options = TrtBuildOptions(fp16=fp16, timing_cache=timing_cache_path(cache, session.device))
    builder = TrtBuilder(session, options, engine_dir=cache)
    (out / "trt").mkdir(exist_ok=True)
    entries: list[SegmentEntry] = []
    worst = 0.0
    try:
        for start, end in reporter.track(ranges, "build TensorRT engines"):
            built = builder.build_segment(out / segment_filename(start, end),
                                          fingerprint=fingerprint, start=start, end=end,
                                          note=reporter.note)
            target = out / "trt" / built.path.name
            try:
                os.link(built.path, target)
            except OSError:
                shutil.copyfile(built.path, target)
            entries.append(SegmentEntry(start=start, end=end,
                                        path=f"trt/{built.path.name}",
                                        precision=options.precision, key=built.key))
            engine = open_engine(target, start, end, session=session)
            reference = open_ort(start, end)
            try:
                agreement = verify_against(reference, engine,  # type: ignore[arg-type]
                                           activations[start][:1], options.precision,
                                           final_segment=end == blocks)
            finally:
                engine.close()
                reference.close()  # type: ignore[attr-defined]
            worst = max(worst, agreement.max_abs_error)
    finally:
        session.close()
    return entries, worst


def trt_verification(entries: Sequence[SegmentEntry], max_abs_error: float, *,
                     fp16: bool) -> Verification:
    """The manifest's record of how the TensorRT engines were checked."""
    return Verification(
        passed=True, max_abs_error=max_abs_error, tolerance=1.0 if fp16 else 1e-3,
        samples=1, top1_agreement=1.0, segments_checked=len(entries),
        detail=f"TensorRT {'fp16' if fp16 else 'fp32'} engines against ONNX Runtime on each "
               "segment" + (" (fp16: top-1 of the final segment must agree)" if fp16 else ""))
