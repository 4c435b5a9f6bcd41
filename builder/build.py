"""``armdi build``: model source -> ONNX -> cut points -> segments -> verification -> profile
-> manifest, staged in ``<repo>/.staging`` and moved into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import onnx

from builder import graph as graph_mod
from builder import segments as seg_mod
from builder.memory import (
    MB,
    MemoryBudget,
    children_peak_rss_bytes,
    fmt,
    peak_rss_bytes,
    release_freed,
    reset_peak,
    session_estimate,
)
from builder.profile import median_ms, profile, sample_segments
from builder.progress import Reporter, SilentReporter
from builder.sources import OPSET, SourceModel, resolve
from builder.trt_plan import TrtPlanOptions
from builder.verify import sample_inputs, verify
from engines.base import Engine
from engines.errors import BuildError
from engines.manifest import (
    FileEntry,
    Manifest,
    SegmentEntry,
    TensorInfo,
    Verification,
    content_fingerprint,
)
from engines.ort import OrtEngine
from engines.repository import MANIFEST, ModelRepository, sha256_file, write_json_atomic

FULL_MODEL = "model.onnx"
STAGING = ".staging"
ARMDI_VERSION = "0.1.0"


@dataclass(frozen=True)
class BuildOptions:
    model: str
    repo: Path
    weights: str = "pretrained"
    name: str | None = None
    input_size: int | None = None  # ONNX files with a dynamic height/width need it
    input_width: int | None = None  # named models: a non-square input (input_size high)
    backend: str = "auto"  # auto | ort | trt
    segments: str = "all"  # all | blocks | window:W
    max_blocks: int | None = None
    threads: int = 1
    profile_repeats: int = 20
    profile_segments: int = 24  # fused segments to time, spread over all lengths
    fp16: bool = False
    opset: int | None = None  # None: 18 (dynamo exporter); 17: the TorchScript exporter
    max_memory: int | None = None  # bytes of resident memory the build may use after export
    trt: TrtPlanOptions = field(default_factory=TrtPlanOptions)  # disk budget, likely order


@dataclass
class BuildReport:
    manifest: Manifest
    path: Path
    seconds: dict[str, float] = field(default_factory=dict)
    # peak resident memory (MB): "export" (the torch export's child process, or reading an
    # ONNX file), each later phase ("analyse", "extract", "verify", "profile", ...) and
    # "build" (the largest after the export); empty where /proc/self/status is not available
    peak_rss_mb: dict[str, float] = field(default_factory=dict)


def _prepare_repo(root: Path) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = root / STAGING
        staging.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=staging, prefix="probe"):
            pass
    except OSError as exc:
        raise BuildError(f"the repository {root} is not writable ({exc.strerror or exc}); "
                         "choose another with --repo") from exc
    return staging


def _clean_stale(staging: Path) -> None:
    """Remove staging folders whose builder process is gone (an interrupted build)."""
    for entry in staging.iterdir():
        pid_text = entry.name.rsplit("-", 1)[-1]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass


def build(options: BuildOptions, reporter: Reporter | None = None) -> BuildReport:
    reporter = reporter or SilentReporter()
    if options.backend not in ("auto", "ort", "trt"):
        raise BuildError(f"--backend {options.backend!r}: use auto, ort or trt")
    seg_mod.segment_ranges(2, options.segments)  # validate the option before any work
    opset = options.opset
    if _wants_trt(options.backend):
        from builder.trt_stage import require_tensorrt

        # TensorRT 8.x parses ONNX opset 17 at most (JetPack 6.0); 10.x takes 18.
        if require_tensorrt() < 10 and opset is None:
            opset = 17
    from builder.shipped import shipped_model

    shipped = shipped_model(options)
    if shipped is not None:  # a model shipped here (armdi unpack): its TensorRT plans only
        from builder.shipped import build_trt_for_shipped

        manifest, path, seconds = build_trt_for_shipped(options, shipped, reporter)
        return BuildReport(manifest, path, seconds)
    budget = MemoryBudget(options.max_memory)
    repo = ModelRepository(options.repo)
    staging_root = _prepare_repo(repo.root)
    _clean_stale(staging_root)
    timings: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(dir=staging_root, prefix=f"build-{os.getpid()}-"))
    work = work.rename(staging_root / f"{work.name}-{os.getpid()}")
    try:
        t0 = time.perf_counter()
        source = resolve(options.model, work, weights=options.weights, name=options.name,
                         input_size=options.input_size, input_width=options.input_width,
                         opset=opset, on_progress=reporter.note)
        timings["export_s"] = time.perf_counter() - t0
        peaks: dict[str, float] = {}
        export_peak = max(peak_rss_bytes() or 0, children_peak_rss_bytes())
        if export_peak and reset_peak():
            peaks["export"] = export_peak / MB
        budget.check("exporting or reading the model source")
        out_dir = work / source.model_id
        out_dir.mkdir()
        manifest = _build_into(out_dir, source, options, reporter, timings, budget, peaks)
        if "export" in peaks:
            peaks["build"] = max(v for k, v in peaks.items() if k != "export")
        final = repo.model_dir(manifest.model_id)
        if final.exists():
            trash = staging_root / f"old-{manifest.model_id}-{os.getpid()}"
            final.rename(trash)
            out_dir.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            out_dir.rename(final)
        return BuildReport(manifest, final, timings, peaks)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_into(out: Path, source: SourceModel, options: BuildOptions, reporter: Reporter,
                timings: dict[str, float], budget: MemoryBudget,
                peaks: dict[str, float]) -> Manifest:
    def done(phase: str, since: float) -> None:
        """Record a phase's seconds and, where it can be reset per phase, its peak RSS."""
        timings[f"{phase}_s"] = time.perf_counter() - since
        peak = peak_rss_bytes()
        if "export" in peaks and peak is not None:
            peaks[phase] = peak / MB
            reset_peak()

    t0 = time.perf_counter()
    reporter.note(f"loading {source.onnx_path.name}")
    try:
        model = onnx.load(str(source.onnx_path))
    except Exception as exc:
        raise BuildError(f"{source.onnx_path}: cannot load ONNX ({exc})") from exc
    if graph_mod.sort_nodes(model):
        reporter.note("the file's nodes were not in topological order; sorted them")
    if source.source.kind == "onnx":
        _fix_input_size(model, options.input_size, source.onnx_path)
    analysis = graph_mod.analyse(model)
    light = seg_mod.externalize(model, out / seg_mod.WEIGHTS_FILE)
    del model  # from here on the weights live in weights.bin only
    release_freed()
    infos = seg_mod.value_infos(light)
    onnx.save(light, str(out / FULL_MODEL))
    probed = seg_mod.resolve_cut_shapes(out / FULL_MODEL, analysis, infos)
    if probed:
        reporter.note(f"read the shapes of {len(probed)} cut tensor(s) from a run of the "
                      "model (shape inference could not fold them)")
    batchless = seg_mod.batchless_cuts(analysis, infos)
    if batchless:
        reporter.note(f"{len(batchless)} cut tensor(s) without a batch axis "
                      f"({', '.join(analysis.cuts[k] for k in sorted(batchless))}); their "
                      "blocks are joined")
        analysis = graph_mod.drop_cuts(analysis, batchless)
    cuts = seg_mod.cut_points(light, analysis, infos)
    input_shape = cuts[0].shape
    if len(input_shape) != 4:
        raise BuildError(f"the model input {cuts[0].name!r} has shape {input_shape}; "
                         "an image model takes (N, C, H, W)")
    if source.source.kind == "onnx" and input_shape[2] == input_shape[3] > 0 \
            and input_shape[2] != source.preprocessing.crop:
        # An ONNX file's model says its own input size; --input-size only guessed it.
        size = input_shape[2]
        source = replace(source, preprocessing=source.preprocessing.model_copy(
            update={"crop": size, "resize": round(size * 256 / 224)}))
    reporter.note(f"{analysis.blocks} blocks between {len(cuts)} cut points")
    done("analyse", t0)

    def save_segment(start: int, end: int) -> str:
        name = seg_mod.segment_filename(start, end)
        onnx.save(seg_mod.extract(light, analysis, infos, start, end), str(out / name))
        return name

    def open_segment(start: int, end: int) -> Engine:
        return OrtEngine(out / seg_mod.segment_filename(start, end), start, end,
                         threads=options.threads, providers=["CPUExecutionProvider"])

    def open_full(prepacking: bool = True) -> Engine:
        return OrtEngine(out / FULL_MODEL, 0, analysis.blocks, threads=options.threads,
                         providers=["CPUExecutionProvider"], prepacking=prepacking)

    def open_once(start: int, end: int) -> Engine:
        """For engines run once (verification): no pre-packed copy of the weights, so a
        session opens in milliseconds and maps the weights file instead of copying it."""
        return OrtEngine(out / seg_mod.segment_filename(start, end), start, end,
                         threads=options.threads, providers=["CPUExecutionProvider"],
                         prepacking=False)

    inputs = sample_inputs(input_shape, source.preprocessing)
    if options.max_blocks is not None and analysis.blocks > options.max_blocks:
        t0 = time.perf_counter()
        costs = []
        x = inputs[:1]
        for k in reporter.track(range(analysis.blocks), "measure fine blocks"):
            save_segment(k, k + 1)
            engine = open_segment(k, k + 1)
            costs.append(median_ms(lambda e=engine, v=x: e.infer(v), 5, warmup=1))  # type: ignore[misc]
            x = engine.infer(x)
            engine.close()
            (out / seg_mod.segment_filename(k, k + 1)).unlink()
        analysis = seg_mod.merge_blocks(analysis, costs, options.max_blocks)
        cuts = tuple(c for c in cuts if c.name in set(analysis.cuts))
        cuts = tuple(c.model_copy(update={"index": i}) for i, c in enumerate(cuts))
        reporter.note(f"merged to {analysis.blocks} blocks (--max-blocks {options.max_blocks})")
        done("merge", t0)

    K = analysis.blocks
    input_info = TensorInfo(**cuts[0].model_dump(exclude={"index"}))
    output_info = TensorInfo(**cuts[-1].model_dump(exclude={"index"}))
    fingerprint = content_fingerprint(
        graph_sha256=sha256_file(out / FULL_MODEL),
        weights_sha256=sha256_file(out / seg_mod.WEIGHTS_FILE),
        input=input_info, output=output_info, cut_points=cuts,
        preprocessing=source.preprocessing)
    ranges = sorted(set(seg_mod.segment_ranges(K, options.segments))
                    | {(k, k + 1) for k in range(K)}, key=lambda r: (r[1] - r[0], r))
    t0 = time.perf_counter()
    entries = [SegmentEntry(start=i, end=j, path=save_segment(i, j))
               for i, j in reporter.track(ranges, "extract segments")]
    done("extract", t0)

    t0 = time.perf_counter()
    fused = [r for r in ranges if r[1] - r[0] >= 2]
    weight_bytes = seg_mod.weights_bytes(light)
    kept = sum(c.bytes_per_sample for c in cuts) + (len(inputs) - 1) * (
        cuts[0].bytes_per_sample + cuts[-1].bytes_per_sample)
    largest_activation = len(inputs) * max(c.bytes_per_sample for c in cuts)
    budget.require(session_estimate(weight_bytes, largest_activation) + kept,
                   f"verifying {source.model_id} (the full model: {fmt(weight_bytes)} of "
                   f"weights; one sample's activations at every cut: {fmt(kept)})",
                   "every build runs the full model once, whatever --segments says; raise "
                   "--max-memory, or build on a bigger machine and copy the model folder")
    verification, activations = verify(lambda: open_full(prepacking=False), open_once, K,
                                       fused, inputs, reporter, budget=budget)
    done("verify", t0)

    segments = {"ort": tuple(entries)}
    backend_verification: dict[str, Verification] = {}
    if _wants_trt(options.backend):
        from builder.trt_stage import build_trt, trt_verification

        t0 = time.perf_counter()
        if len(ranges) > 200:
            reporter.note(f"building {len(ranges)} TensorRT engines; on a Jetson each takes "
                          "seconds to minutes (--segments window:W builds fewer)")
        trt_entries, trt_error = build_trt(
            out, Path(options.repo), ranges, fingerprint, activations, open_segment,
            reporter, fp16=options.fp16, blocks=K, **options.trt.build_kwargs(options.segments))
        segments["trt"] = tuple(trt_entries)
        backend_verification["trt"] = trt_verification(trt_entries, trt_error, fp16=options.fp16)
        reporter.note(f"TensorRT: {len(trt_entries)} engines, max abs error vs ONNX Runtime "
                      f"{trt_error:.2g}")
        done("trt", t0)

    t0 = time.perf_counter()
    device_profile = profile(open_full, open_segment, K,
                             sample_segments(fused, options.profile_segments), activations,
                             reporter, backend="ort", threads=options.threads,
                             repeats=options.profile_repeats)
    budget.check("profiling")
    done("profile", t0)

    all_files = sorted(p for p in out.rglob("*") if p.is_file())
    files = {p.relative_to(out).as_posix(): FileEntry(sha256=sha256_file(p),
                                                      bytes=p.stat().st_size)
             for p in reporter.track(all_files, "hash files")}
    manifest = Manifest(
        model_id=source.model_id,
        fingerprint=fingerprint,
        source=source.source,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        armdi_version=ARMDI_VERSION,
        opset=max((o.version for o in light.opset_import if o.domain in ("", "ai.onnx")),
                  default=OPSET),
        input=input_info,
        output=output_info,
        preprocessing=source.preprocessing,
        labels=source.labels if _is_classifier(cuts[-1].shape, source.labels) else None,
        blocks=K,
        cut_points=cuts,
        full_model=FULL_MODEL,
        weights_file=seg_mod.WEIGHTS_FILE,
        segment_mode=options.segments,
        segments=segments,
        files=files,
        verification=verification,
        backend_verification=backend_verification,
        profiles={f"{device_profile.device}/ort/t{options.threads}": device_profile},
    )
    write_json_atomic(out / MANIFEST, manifest.model_dump(mode="json"))
    peak = peak_rss_bytes()
    if "export" in peaks and peak is not None:
        peaks["manifest"] = peak / MB  # hashing and writing; not timed (see build_figures)
    return manifest


def _fix_input_size(model: onnx.ModelProto, size: int | None, path: Path) -> None:
    """Check an ONNX file's input height/width against ``--input-size``; fix dynamic ones."""
    from builder.graph import graph_io

    name = graph_io(model)[0]
    vi = next(i for i in model.graph.input if i.name == name)
    dims = vi.type.tensor_type.shape.dim
    if len(dims) != 4:
        return  # refused later with the shape in the message
    static = [d.dim_value if d.HasField("dim_value") else None for d in dims[2:]]
    if None not in static:
        if size is not None and static != [size, size]:
            raise BuildError(f"{path}: the model's input is {static[0]}x{static[1]}; "
                             f"--input-size {size} does not match (leave it out)")
        return
    if size is None:
        raise BuildError(f"{path}: the model's input has a dynamic height/width; give "
                         "--input-size N")
    for dim in dims[2:]:
        dim.Clear()
        dim.dim_value = size
    del model.graph.value_info[:]  # shapes are inferred again for this size


def _wants_trt(backend: str) -> bool:
    """``trt`` always (failing clearly without TensorRT); ``auto`` where TensorRT imports."""
    if backend == "trt":
        return True
    if backend == "auto":
        from engines.trt import tensorrt_major

        return tensorrt_major() is not None
    return False


def _is_classifier(shape: tuple[int, ...], labels: tuple[str, ...] | None) -> bool:
    return labels is not None and len(shape) == 2 and shape[1] == len(labels)
