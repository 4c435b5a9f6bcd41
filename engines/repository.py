"""The model repository on disk.

```
<repo>/<model_id>/manifest.json     written last; no manifest, no model
<repo>/<model_id>/model.onnx        the full model (weights in weights.bin)
<repo>/<model_id>/weights.bin       every large initializer, once
<repo>/<model_id>/seg_IIII_JJJJ.onnx  segment [I, J) for ONNX Runtime
<repo>/<model_id>/trt/...           TensorRT engines, where built
<repo>/.staging/                    builds in progress (never served)
```
Every file a manifest names is checked (size, then sha256) before an engine is made from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engines.base import Engine
from engines.chained import ChainedEngine
from engines.errors import ArtifactError, ManifestError, ModelNotFoundError
from engines.manifest import SCHEMA_VERSION, DeviceProfile, Manifest

MANIFEST = "manifest.json"


def default_repo() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("armdi"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ModelRepository:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root is not None else default_repo()
        self._verified: set[tuple[str, int, int]] = set()
        self._lock = threading.Lock()
        self._trt_session: Any = None  # one per process, made on the first TensorRT engine

    def serving_backend(self, manifest: Manifest, wanted: str) -> str:
        """``wanted`` if the manifest has engines for it, else ONNX Runtime (with a log line:
        a model built where TensorRT is absent still serves)."""
        if wanted in manifest.segments:
            return wanted
        if wanted != "ort":
            import logging

            logging.getLogger("armdi.engines").warning(
                "%s has no %s engines (built on a machine without it?); serving with ONNX "
                "Runtime. Rebuild with: armdi build %s --backend %s", manifest.model_id,
                wanted, manifest.model_id, wanted)
        return "ort"

    def close(self) -> None:
        """Release the TensorRT session, if one was made."""
        if self._trt_session is not None:
            self._trt_session.close()
            self._trt_session = None

    def model_dir(self, model_id: str) -> Path:
        return self.root / model_id

    def list_models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())

    def has_model(self, model_id: str) -> bool:
        return (self.model_dir(model_id) / MANIFEST).is_file()

    def load_manifest(self, model_id: str) -> Manifest:
        path = self.model_dir(model_id) / MANIFEST
        if not path.is_file():
            known = ", ".join(self.list_models()) or "none"
            raise ModelNotFoundError(
                f"model {model_id!r} is not in the repository {self.root} (built: {known}); "
                f"run: armdi build {model_id} --repo {self.root}"
            )
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ManifestError(f"{path}: unreadable manifest ({exc}); rebuild: "
                                f"armdi build {model_id} --repo {self.root}") from exc
        return self.parse_manifest(raw, model_id, path)

    def parse_manifest(self, raw: bytes, model_id: str, path: Path | str = MANIFEST) -> Manifest:
        """Check and parse the bytes of ``model_id``'s manifest (``path`` names it in errors):
        any problem is a ``ManifestError`` that says how to rebuild."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # digits, nesting
            raise ManifestError(f"{path}: unreadable manifest ({exc}); rebuild: "
                                f"armdi build {model_id} --repo {self.root}") from exc
        version = data.get("schema_version") if isinstance(data, dict) else None
        source = data.get("source") if isinstance(data, dict) else None
        hint = self._rebuild(model_id, source if isinstance(source, dict) else {})
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{path}: manifest schema version {version!r}, this armdi reads version "
                f"{SCHEMA_VERSION} (built by another armdi version); rebuild: {hint} (or "
                "unpack a pack made by this version)"
            )
        try:
            manifest = Manifest.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ManifestError(f"{path}: {where}: {err['msg']}; rebuild: {hint}") from exc
        try:
            content = manifest.content_fingerprint()
        except ValueError as exc:
            raise ManifestError(f"{path}: {exc}; rebuild: {hint}") from exc
        if content != manifest.fingerprint:
            raise ManifestError(
                f"{path}: fingerprint {manifest.fingerprint[:12]} does not match the "
                f"manifest's content ({content[:12]}; edited by hand?); rebuild: {hint}")
        return manifest

    def check_file(self, manifest: Manifest, relpath: str) -> Path:
        """The path of ``relpath``, after checking its size and sha256 against the manifest."""
        path = self.model_dir(manifest.model_id) / relpath
        entry = manifest.files.get(relpath)
        rebuild = f"rebuild: {self.rebuild_command(manifest)}"
        if entry is None:
            raise ArtifactError(f"{path}: not listed in the manifest; {rebuild}")
        try:
            stat = path.stat()
        except FileNotFoundError as exc:
            raise ArtifactError(f"{path}: missing; {rebuild}") from exc
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._verified:
                return path
        if stat.st_size != entry.bytes:
            raise ArtifactError(
                f"{path}: {stat.st_size} bytes, the manifest says {entry.bytes} (truncated or "
                f"replaced); {rebuild}"
            )
        if sha256_file(path) != entry.sha256:
            raise ArtifactError(f"{path}: sha256 does not match the manifest (modified or "
                                f"corrupt); {rebuild}")
        with self._lock:
            self._verified.add(key)
        return path

    def rebuild_command(self, manifest: Manifest) -> str:
        """The ``armdi build`` command that makes this model again, from the same source."""
        return self._rebuild(manifest.model_id, manifest.source.model_dump())

    def _rebuild(self, model_id: str, source: dict[str, object]) -> str:
        what = model_id
        if source.get("kind") == "onnx" and source.get("name"):
            what = f"{source['name']} --name {model_id}"
        elif source.get("weights") not in (None, "pretrained"):
            what = f"{model_id} --weights {source['weights']}"
        return f"armdi build {what} --repo {self.root}"

    def save_profile(self, model_id: str, profile: DeviceProfile) -> Manifest:
        """Add (or replace) this device's ``profile`` in the model's manifest. Profiles are
        outside the fingerprint: they belong to the device, not to the model."""
        manifest = self.load_manifest(model_id)
        key = f"{profile.device}/{profile.backend}/t{profile.threads}"
        updated = manifest.model_copy(update={"profiles": {**manifest.profiles,
                                                           key: profile}})
        write_json_atomic(self.model_dir(model_id) / MANIFEST, updated.model_dump(mode="json"))
        return updated

    def check_all(self, manifest: Manifest) -> None:
        for relpath in manifest.files:
            self.check_file(manifest, relpath)

    def open_engine(
        self,
        manifest: Manifest,
        start: int,
        end: int,
        *,
        backend: str = "ort",
        threads: int = 1,
        fused: bool = True,
        trt_session: Any = None,
    ) -> Engine:
        """An engine for ``[start, end)``: the fused segment when built, else chained blocks."""
        if not 0 <= start < end <= manifest.blocks:
            raise ArtifactError(f"segment [{start}, {end}) is outside the model's "
                                f"{manifest.blocks} blocks")
        if fused and manifest.segment(backend, start, end) is not None:
            return self._open_one(manifest, backend, start, end, threads, trt_session)
        parts: list[Engine] = []
        try:
            for k in range(start, end):
                parts.append(self._open_one(manifest, backend, k, k + 1, threads, trt_session))
        except Exception:
            for part in parts:
                part.close()
            raise
        return parts[0] if len(parts) == 1 else ChainedEngine(parts)

    def _open_one(self, manifest: Manifest, backend: str, start: int, end: int,
                  threads: int, trt_session: Any = None) -> Engine:
        entry = manifest.segment(backend, start, end)
        if entry is None:
            raise ArtifactError(
                f"{manifest.model_id}: no {backend} engine for block [{start}, {end}); "
                f"rebuild: {self.rebuild_command(manifest)} --backend {backend}"
            )
        self.check_file(manifest, manifest.weights_file)
        path = self.check_file(manifest, entry.path)
        if backend == "ort":
            from engines.ort import OrtEngine

            return OrtEngine(path, start, end, threads=threads)
        if backend == "trt":
            from engines import trt

            if trt_session is None:
                with self._lock:
                    if self._trt_session is None:
                        self._trt_session = trt.TrtSession.start()
                    trt_session = self._trt_session
            # A weight-stripped plan is refitted from the segment's own ONNX file, which
            # points into the shared weights file checked above.
            onnx_entry = manifest.segment("ort", start, end)
            refit_from = (self.check_file(manifest, onnx_entry.path)
                          if onnx_entry is not None else None)
            engine: Engine = trt.open_engine(path, start, end, session=trt_session,
                                             refit_from=refit_from)
            return engine
        raise ArtifactError(f"unknown backend {backend!r}")


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
    os.replace(tmp, path)
