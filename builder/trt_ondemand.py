"""One fused TensorRT engine built on demand, and the manifest updated safely.

A build prebuilds block engines and the most likely fused segments (``builder.trt_plan``);
the rest are built when a node first needs them. The node keeps serving that range with
chained block engines meanwhile and starts this module in a low-priority process
(``appliance.data.fused_builds``):

```
python -m builder.trt_ondemand --repo DIR MODEL_ID START END
```

``build_missing_segment`` builds and verifies the engine of ``[start, end)`` from the
segment's ONNX file (weight-stripped on TensorRT 10), records it in the build journal (so a
later ``armdi build`` keeps it), links it into the model directory and adds it to the manifest
under a file lock, re-reading the manifest first: two builders, or a builder and
``save_profile``, never lose each other's update, and readers see the old manifest or the new
one (atomic replace). Engines live outside the fingerprint, which is unchanged.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engines.errors import ArmdiError, BuildError
from engines.manifest import FileEntry, Manifest, SegmentEntry
from engines.repository import MANIFEST, ModelRepository, sha256_file, write_json_atomic

LOCK_FILE = ".manifest.lock"


@contextmanager
def manifest_lock(model_dir: Path) -> Iterator[None]:
    """An exclusive lock on the model's manifest updates (``flock`` on a side file)."""
    with (Path(model_dir) / LOCK_FILE).open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def add_trt_segment(repository: ModelRepository, model_id: str, entry: SegmentEntry
                    ) -> Manifest:
    """Add ``entry`` (a file under the model directory) to the manifest's TensorRT segments,
    under the lock, re-reading the manifest first."""
    model_dir = repository.model_dir(model_id)
    with manifest_lock(model_dir):
        manifest = repository.load_manifest(model_id)
        path = model_dir / entry.path
        others = tuple(e for e in manifest.segments.get("trt", ())
                       if (e.start, e.end) != (entry.start, entry.end))
        updated = manifest.model_copy(update={
            "segments": {**manifest.segments, "trt": (*others, entry)},
            "files": {**manifest.files,
                      entry.path: FileEntry(sha256=sha256_file(path),
                                            bytes=path.stat().st_size)},
        })
        write_json_atomic(model_dir / MANIFEST, updated.model_dump(mode="json"))
        return updated


def build_missing_segment(
    repo_root: Path,
    model_id: str,
    start: int,
    end: int,
    *,
    session: Any = None,
    note: Callable[[str], None] = lambda message: None,
) -> SegmentEntry:
    """The TensorRT engine of ``[start, end)``: the manifest's when it has one, else built,
    verified against ONNX Runtime, journaled, linked and added to the manifest.

    ``session``: a ``TrtSession`` to build on (a new one is started and closed otherwise).
    Precision follows the model's existing TensorRT engines (fp32 where it has none).
    """
    from builder.segments import segment_filename
    from builder.trt_build import TrtBuilder, TrtBuildOptions, timing_cache_path, verify_against
    from builder.trt_resume import BuildJournal, DoneEngine
    from builder.trt_stage import TRT_CACHE
    from builder.verify import sample_inputs
    from engines.ort import OrtEngine
    from engines.trt import TrtSession, open_engine

    repository = ModelRepository(repo_root)
    manifest = repository.load_manifest(model_id)
    existing = manifest.segment("trt", start, end)
    if existing is not None:
        return existing
    onnx_entry = manifest.segment("ort", start, end)
    if onnx_entry is None:
        raise BuildError(f"{model_id} has no ONNX segment [{start}, {end}) to build from; "
                         f"rebuild with --segments all: {repository.rebuild_command(manifest)}")
    model_dir = repository.model_dir(model_id)
    onnx_path = repository.check_file(manifest, onnx_entry.path)
    repository.check_file(manifest, manifest.weights_file)
    fp16 = any(e.precision == "fp16" for e in manifest.segments.get("trt", ()))
    own_session = session is None
    session = TrtSession.start() if own_session else session
    try:
        cache = repository.root / TRT_CACHE
        options = TrtBuildOptions(fp16=fp16, timing_cache=timing_cache_path(cache,
                                                                           session.device))
        builder = TrtBuilder(session, options, engine_dir=cache)
        journal = BuildJournal.open(cache, manifest.fingerprint, session.device.slug,
                                    options.precision, builder.stripped)
        built = builder.build_segment(onnx_path, fingerprint=manifest.fingerprint,
                                      start=start, end=end, note=note)
        x = sample_inputs(manifest.input.shape, manifest.preprocessing, count=1)
        for k in range(start):  # the activation at cut `start`, from the ONNX blocks
            block = OrtEngine(model_dir / segment_filename(k, k + 1), k, k + 1)
            try:
                x = block.infer(x)
            finally:
                block.close()
        engine = open_engine(built.path, start, end, session=session, refit_from=onnx_path)
        reference = OrtEngine(onnx_path, start, end)
        try:
            agreement = verify_against(reference, engine, x, options.precision,
                                       final_segment=end == manifest.blocks)
        except ArmdiError as exc:
            journal.record_failed(start, end, str(exc))
            raise
        finally:
            engine.close()
            reference.close()
        journal.record_done(start, end, DoneEngine(built.key, built.path.stat().st_size, 0.0,
                                                   agreement.max_abs_error))
    finally:
        if own_session:
            session.close()
    (model_dir / "trt").mkdir(exist_ok=True)
    target = model_dir / "trt" / built.path.name
    if not target.exists():
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        try:
            os.link(built.path, tmp)
        except OSError:
            shutil.copyfile(built.path, tmp)
        os.replace(tmp, target)
    entry = SegmentEntry(start=start, end=end, path=f"trt/{built.path.name}",
                         precision=options.precision, key=built.key)
    add_trt_segment(repository, model_id, entry)
    note(f"built the fused TensorRT engine [{start}, {end}) of {model_id}")
    return entry


def main(argv: list[str] | None = None) -> int:
    """``python -m builder.trt_ondemand --repo DIR MODEL START END`` (the node's hook)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("model_id")
    parser.add_argument("start", type=int)
    parser.add_argument("end", type=int)
    args = parser.parse_args(argv)
    try:
        entry = build_missing_segment(args.repo, args.model_id, args.start, args.end,
                                      note=lambda m: print(m, file=sys.stderr))
    except ArmdiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(entry.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
