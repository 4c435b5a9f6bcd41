"""TensorRT engines for a model that is already in the repository (built elsewhere and
installed with ``armdi unpack``): built from the shipped segment files, with no export and
no torch, so the model, and its fingerprint, stay exactly the ones shipped.

``armdi build MODEL --backend trt`` takes this path when MODEL is a model id in the
repository and no option asks for another model (``--weights`` other than the built ones,
``--max-blocks``, ``--opset``, ``--input-size``); an ONNX file path is always built afresh.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from builder.progress import Reporter
from builder.segments import segment_filename, segment_ranges
from engines.base import Engine
from engines.errors import BuildError
from engines.manifest import FileEntry, Manifest
from engines.repository import MANIFEST, ModelRepository, sha256_file, write_json_atomic

if TYPE_CHECKING:
    from builder.build import BuildOptions

TRT8_MAX_OPSET = 17


def shipped_model(options: BuildOptions) -> Manifest | None:
    """The manifest of the model ``options`` name when only its TensorRT engines are to be
    built, else None (a full build)."""
    if options.backend != "trt":
        return None
    if options.model.endswith(".onnx") or Path(options.model).expanduser().exists():
        return None
    repository = ModelRepository(options.repo)
    model_id = options.name or options.model
    if not repository.has_model(model_id):
        return None
    manifest = repository.load_manifest(model_id)
    other_model = (options.weights not in ("pretrained", manifest.source.weights)
                   or options.max_blocks is not None or options.opset is not None
                   or options.input_size is not None)
    return None if other_model else manifest


def build_trt_for_shipped(options: BuildOptions, manifest: Manifest, reporter: Reporter
                          ) -> tuple[Manifest, Path, dict[str, float]]:
    """Build, verify and record TensorRT engines for the shipped ONNX Runtime segments."""
    from builder.trt_stage import build_trt, require_tensorrt, trt_verification
    from builder.verify import sample_inputs
    from engines.ort import OrtEngine

    t0 = time.perf_counter()
    if require_tensorrt() < 10 and manifest.opset > TRT8_MAX_OPSET:
        raise BuildError(
            f"{manifest.model_id} was built with ONNX opset {manifest.opset}; TensorRT 8.x "
            f"reads opset {TRT8_MAX_OPSET} at most. On the build machine run: armdi build "
            f"{manifest.model_id} --opset {TRT8_MAX_OPSET}, then armdi pack it and armdi "
            "unpack it here")
    repository = ModelRepository(options.repo)
    out = repository.model_dir(manifest.model_id)
    shipped = manifest.segments.get("ort", ())
    for relpath in (manifest.full_model, manifest.weights_file, *(e.path for e in shipped)):
        repository.check_file(manifest, relpath)
    blocks = manifest.blocks
    available = {(e.start, e.end) for e in shipped}
    wanted = set(segment_ranges(blocks, options.segments)) | {(k, k + 1) for k in range(blocks)}
    ranges = sorted(wanted & available, key=lambda r: (r[1] - r[0], r))
    if wanted - available:
        reporter.note(f"{len(wanted - available)} of the requested segments were not shipped; "
                      "nodes chain block engines for those")

    def open_segment(start: int, end: int) -> Engine:
        return OrtEngine(out / segment_filename(start, end), start, end,
                         threads=options.threads, providers=["CPUExecutionProvider"])

    x = sample_inputs(manifest.input.shape, manifest.preprocessing, count=1)
    activations = [x]
    for k in range(blocks):
        engine = open_segment(k, k + 1)
        try:
            x = engine.infer(x)
        finally:
            engine.close()
        activations.append(x)
    reporter.note(f"building TensorRT engines for {len(ranges)} shipped segments of "
                  f"{manifest.model_id} (fingerprint {manifest.fingerprint[:12]})")
    entries, error = build_trt(out, repository.root, ranges, manifest.fingerprint, activations,
                               open_segment, reporter, fp16=options.fp16, blocks=blocks,
                               **options.trt.build_kwargs(options.segments))
    files = {k: v for k, v in manifest.files.items() if not k.startswith("trt/")}
    for entry in entries:
        path = out / entry.path
        files[entry.path] = FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
    updated = manifest.model_copy(update={
        "segments": {**manifest.segments, "trt": tuple(entries)},
        "files": files,
        "backend_verification": {**manifest.backend_verification,
                                 "trt": trt_verification(entries, error, fp16=options.fp16)},
    })
    write_json_atomic(out / MANIFEST, updated.model_dump(mode="json"))
    return updated, out, {"trt_s": time.perf_counter() - t0}
