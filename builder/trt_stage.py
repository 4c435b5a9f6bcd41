"""The TensorRT stage of ``armdi build``: an engine per segment, verified against ONNX Runtime.

Engines are built into ``<repo>/.trt-cache`` (keyed by model, segment, TensorRT version,
GPU, precision and profile, with one timing cache per device) and linked into the model
directory, so a rebuild of the same model on the same device reuses them.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from builder.progress import Reporter
from builder.segments import segment_filename
from builder.trt_plan import PREBUILD_RATIO
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
    max_disk: int | None = None,
    prebuild_ratio: float | None = PREBUILD_RATIO,
    boundaries: Sequence[int] | None = None,
    workers: int = 3,
    segments: str = "all",
) -> tuple[list[SegmentEntry], float]:
    """Build, link and verify TensorRT engines, block engines first and then fused segments
    most likely first (``builder.trt_plan``), resuming an interrupted build from its journal
    (``builder.trt_resume``). A fused segment that fails is recorded and left to chained
    block engines; a failing block engine fails the build (after the rest are built).
    Returns the entries and the largest error against ONNX Runtime."""
    require_tensorrt()
    import onnx

    from builder.trt_build import (
        TrtBuilder,
        TrtBuildOptions,
        check_ops,
        engine_key,
        timing_cache_path,
        verify_against,
    )
    from builder.trt_plan import free_disk, make_plan, plan_kind, stats_from_model_dir
    from builder.trt_resume import (
        BuildJournal,
        DoneEngine,
        failed_blocks,
        measured_seconds_per_engine,
        run_builds,
    )
    from engines.errors import BuildError
    from engines.trt import TrtSession, open_engine

    session = TrtSession.start()
    try:
        # Pre-flight: say which ops this TensorRT cannot import before minutes of builds.
        problems = check_ops(onnx.load(str(out / "model.onnx"), load_external_data=False),
                             session.device.trt_version)
        if problems:
            raise BuildError(f"TensorRT {session.device.trt_version} cannot build this model: "
                             + "; ".join(problems))
        cache = repo_root / TRT_CACHE
        cache.mkdir(parents=True, exist_ok=True)
        options = TrtBuildOptions(fp16=fp16,
                                  timing_cache=timing_cache_path(cache, session.device))
        builder = TrtBuilder(session, options, engine_dir=cache)
        journal = BuildJournal.open(cache, fingerprint, session.device.slug,
                                    options.precision, builder.stripped)
        measured = measured_seconds_per_engine(cache, session.device.slug)
        plan = make_plan(stats_from_model_dir(out, out.name, blocks), ranges,
                         segments=segments, kind=plan_kind(session.device.trt_version),
                         fp16=fp16, free_disk_bytes=free_disk(repo_root),
                         max_disk_bytes=max_disk, boundaries=boundaries,
                         seconds_per_engine=measured, prebuild_ratio=prebuild_ratio,
                         done=journal.done, workers=workers)
        if plan.refused:
            raise BuildError(f"refusing the TensorRT build:\n{plan.render()}")
        reporter.note(f"TensorRT: {len(plan.prebuild)} of {plan.engines} engines now, most "
                      f"likely first ({'stripped' if builder.stripped else 'full'} plans, "
                      f"{plan.needed_bytes / 1e6:,.1f} MB); the rest on demand")
        (out / "trt").mkdir(exist_ok=True)

        def key_of(start: int, end: int) -> str:
            return engine_key(fingerprint, start, end, session.device, options)

        def build_one(start: int, end: int) -> DoneEngine:
            t0 = time.perf_counter()
            onnx_path = out / segment_filename(start, end)
            built = builder.build_segment(onnx_path, fingerprint=fingerprint, start=start,
                                          end=end, note=reporter.note)
            engine = open_engine(built.path, start, end, session=session,
                                 refit_from=onnx_path)
            reference = open_ort(start, end)
            try:
                agreement = verify_against(reference, engine,  # type: ignore[arg-type]
                                           activations[start][:1], options.precision,
                                           final_segment=end == blocks)
            finally:
                engine.close()
                reference.close()  # type: ignore[attr-defined]
            return DoneEngine(built.key, built.path.stat().st_size,
                              time.perf_counter() - t0, agreement.max_abs_error)

        def link(start: int, end: int, item: DoneEngine) -> None:
            source = cache / f"{item.key}.engine"
            target = out / "trt" / source.name
            target.unlink(missing_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)

        outcome = run_builds(plan.prebuild, key_of=key_of, build_one=build_one,
                             journal=journal, engine_dir=cache, reporter=reporter,
                             seconds_per_engine=plan.seconds_per_engine, on_ready=link)
        # Engines built on demand earlier (builder.trt_ondemand) are kept too.
        for (start, end), item in sorted(journal.done.items()):
            if (start, end) in set(ranges) and (start, end) not in outcome.done \
                    and journal.is_done(start, end, key_of(start, end), cache):
                link(start, end, item)
                outcome.done[(start, end)] = item
    finally:
        session.close()
    if outcome.skipped:
        reporter.note(f"TensorRT: {outcome.skipped} engines were built by an earlier run "
                      "(resumed)")
    broken = failed_blocks(outcome.failed)
    if broken:
        raise BuildError("TensorRT could not build block engines "
                         + ", ".join(f"[{s}, {e})" for s, e in broken)
                         + f" (no chain can stand in for them): {outcome.failed[broken[0]]}")
    entries = [SegmentEntry(start=start, end=end, path=f"trt/{item.key}.engine",
                            precision=options.precision, key=item.key)
               for (start, end), item in sorted(outcome.done.items(),
                                                key=lambda kv: (kv[0][1] - kv[0][0], kv[0]))]
    worst = max((item.error for item in outcome.done.values()), default=0.0)
    return entries, worst


def trt_verification(entries: Sequence[SegmentEntry], max_abs_error: float, *,
                     fp16: bool) -> Verification:
    """The manifest's record of how the TensorRT engines were checked."""
    return Verification(
        passed=True, max_abs_error=max_abs_error, tolerance=1.0 if fp16 else 1e-3,
        samples=1, top1_agreement=1.0, segments_checked=len(entries),
        detail=f"TensorRT {'fp16' if fp16 else 'fp32'} engines against ONNX Runtime on each "
               "segment" + (" (fp16: top-1 of the final segment must agree)" if fp16 else ""))
