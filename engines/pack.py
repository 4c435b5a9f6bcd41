"""Packs: one built model as a tar file, to build once and ship to every device.

```
<model_id>/manifest.json      first member; its files, segments and fingerprint
<model_id>/model.onnx         every file the manifest lists, each a plain file
<model_id>/weights.bin
<model_id>/seg_IIII_JJJJ.onnx
```
A pack holds what every device can serve: the ONNX Runtime segments, the full model and the
weights. TensorRT plans belong to one GPU and TensorRT version, so they stay behind; each
Jetson builds its own from the shipped segment files (``armdi build MODEL --backend trt``).

``unpack`` trusts nothing in the tar: every member must be a plain file named
``<model_id>/<name>`` (no absolute path, no ``..``, no link, device or directory tricks), the
manifest must validate and its fingerprint match its content, every file it lists must arrive
with its size and sha256, and no other file may come along. Files are written by us, under
names we check, into ``<repo>/.staging`` and moved into place only when all are verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from engines.errors import ArtifactError, ManifestError
from engines.manifest import SCHEMA_VERSION, Manifest
from engines.repository import MANIFEST, ModelRepository, write_json_atomic

STAGING = ".staging"
SHIPPED_BACKENDS = ("ort",)  # engines every device can run; others are built per device
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAX_MANIFEST_BYTES = 64 << 20


@dataclass(frozen=True)
class PackReport:
    path: Path
    manifest: Manifest
    files: int
    bytes: int


@dataclass(frozen=True)
class UnpackReport:
    manifest: Manifest
    path: Path
    files: int
    bytes: int
    replaced: str | None  # fingerprint of a different model replaced ("unreadable": an old one)
    unchanged: bool  # the same model (fingerprint, intact files) was already there


def shipped_manifest(manifest: Manifest) -> Manifest:
    """The manifest a pack carries: the shipped backends' segments and the files they need.
    The fingerprint does not change (it covers none of what is left out)."""
    segments = {b: s for b, s in manifest.segments.items() if b in SHIPPED_BACKENDS}
    wanted = {manifest.full_model, manifest.weights_file}
    wanted |= {entry.path for entries in segments.values() for entry in entries}
    files = {name: entry for name, entry in manifest.files.items() if name in wanted}
    return manifest.model_copy(update={
        "segments": segments, "files": files,
        "backend_verification": {b: v for b, v in manifest.backend_verification.items()
                                 if b in SHIPPED_BACKENDS},
    })


def pack(repository: ModelRepository, model_id: str, out: Path) -> PackReport:
    """Write ``model_id`` from ``repository`` to the tar file ``out`` (every file checked
    against the manifest first; written to a temporary name, then renamed)."""
    manifest = repository.load_manifest(model_id)
    shipped = shipped_manifest(manifest)
    for relpath in shipped.files:
        repository.check_file(manifest, relpath)
    out = out.expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest_bytes = json.dumps(shipped.model_dump(mode="json"), indent=1).encode()
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    total = len(manifest_bytes)
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, f"{model_id}/{MANIFEST}", manifest_bytes)
            for relpath in sorted(shipped.files):
                path = repository.model_dir(model_id) / relpath
                info = tarfile.TarInfo(f"{model_id}/{relpath}")
                info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
                total += info.size
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp made it private; a pack is meant to be copied
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return PackReport(out, shipped, len(shipped.files) + 1, total)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def unpack(archive: Path, repository: ModelRepository) -> UnpackReport:
    """Install the model in the pack ``archive`` into ``repository``, verifying everything."""
    where = str(archive)
    with _open_tar(archive) as tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArtifactError(f"{where}: damaged tar file ({exc}); copy it again") from exc
        model_id, named = _check_members(where, members)
        manifest = _read_manifest(where, tar, named.pop(MANIFEST, None), model_id)
        extra = sorted(set(named) - set(manifest.files))
        if extra:
            raise ArtifactError(f"{where}: {model_id}/{extra[0]} is not listed in the pack's "
                                "manifest; refusing the pack")
        missing = sorted(set(manifest.files) - set(named))
        if missing:
            raise ArtifactError(f"{where}: {model_id}/{missing[0]} is missing from the pack "
                                "(the manifest lists it); pack the model again")
        staging = repository.root / STAGING
        try:
            staging.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(dir=staging, prefix=f"unpack-{os.getpid()}-"))
            # Named like the builder's, so an interrupted unpack is cleaned by the next build.
            work = work.rename(staging / f"{work.name}-{os.getpid()}")
        except OSError as exc:
            raise ArtifactError(f"the repository {repository.root} is not writable "
                                f"({exc.strerror or exc}); choose another with --repo") from exc
        try:
            target = work / model_id
            target.mkdir()
            total = 0
            for relpath, member in sorted(named.items()):
                total += _extract_verified(where, tar, member, target, relpath, manifest)
            unchanged = _already_installed(repository, manifest)
            if unchanged is not None:
                return unchanged  # verified, and already there: keep its engines, profiles
            write_json_atomic(target / MANIFEST, manifest.model_dump(mode="json"))
            replaced = _replace(repository, manifest, target, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return UnpackReport(manifest, repository.model_dir(model_id), len(named) + 1, total,
                        replaced, False)


def _open_tar(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, "r:*")
    except FileNotFoundError as exc:
        raise ArtifactError(f"{archive}: no such file") from exc
    except (tarfile.TarError, OSError) as exc:
        raise ArtifactError(f"{archive}: not a readable tar file ({exc})") from exc


def _check_members(where: str, members: list[tarfile.TarInfo]
                   ) -> tuple[str, dict[str, tarfile.TarInfo]]:
    """``(model_id, {relpath: member})``; refuses anything but plain files in one folder."""
    model_ids: set[str] = set()
    named: dict[str, tarfile.TarInfo] = {}
    for member in members:
        name = member.name
        parts = PurePosixPath(name).parts
        if name.startswith("/") or "\\" in name or ".." in parts or not parts:
            raise ArtifactError(f"{where}: unsafe path {name!r} in the pack; refusing it")
        if member.isdir() and len(parts) == 1:
            continue  # "<model_id>/" itself
        if not member.isfile():
            kind = "link" if member.issym() or member.islnk() else "special file"
            raise ArtifactError(f"{where}: {name!r} is a {kind}; a pack holds plain files "
                                "only; refusing it")
        if len(parts) < 2 or not _MODEL_ID.fullmatch(parts[0]) \
                or any(p in ("", ".") for p in parts):
            raise ArtifactError(f"{where}: unexpected member {name!r} (a pack holds "
                                "<model_id>/<file>); refusing it")
        model_ids.add(parts[0])
        if len(model_ids) > 1:
            raise ArtifactError(f"{where}: a pack holds one model folder, this one has "
                                f"{len(model_ids)} ({', '.join(sorted(model_ids))}); "
                                "refusing it")
        relpath = "/".join(parts[1:])
        if relpath in named:
            raise ArtifactError(f"{where}: {name!r} appears twice; refusing the pack")
        named[relpath] = member
    if not model_ids:
        raise ArtifactError(f"{where}: the pack is empty (make one with armdi pack)")
    return model_ids.pop(), named


def _read_manifest(where: str, tar: tarfile.TarFile, member: tarfile.TarInfo | None,
                   model_id: str) -> Manifest:
    if member is None:
        raise ManifestError(f"{where}: no {model_id}/{MANIFEST} in the pack; not an armdi "
                            "pack (make one with armdi pack)")
    if member.size > _MAX_MANIFEST_BYTES:
        raise ManifestError(f"{where}: {model_id}/{MANIFEST} is {member.size} bytes; refusing")
    fh = tar.extractfile(member)
    assert fh is not None  # a plain file (checked)
    try:
        data = json.loads(fh.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{where}: {model_id}/{MANIFEST} is not valid JSON ({exc})") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{where}: the pack's manifest has schema version {version!r}, "
                            f"this armdi reads version {SCHEMA_VERSION}; pack the model again "
                            "with the same armdi version as this device's")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ManifestError(f"{where}: {model_id}/{MANIFEST}: {field}: {err['msg']}") from exc
    if manifest.model_id != model_id:
        raise ManifestError(f"{where}: the manifest is for {manifest.model_id!r} but sits in "
                            f"the folder {model_id!r}; refusing the pack")
    try:
        content = manifest.content_fingerprint()
    except ValueError as exc:
        raise ManifestError(f"{where}: {model_id}/{MANIFEST}: {exc}") from exc
    if content != manifest.fingerprint:
        raise ManifestError(f"{where}: the manifest's fingerprint {manifest.fingerprint[:12]} "
                            f"does not match its content ({content[:12]}); refusing the pack")
    for relpath in manifest.files:
        parts = PurePosixPath(relpath).parts
        if relpath.startswith("/") or ".." in parts or relpath == MANIFEST:
            raise ManifestError(f"{where}: the manifest lists an unsafe file {relpath!r}")
    return manifest


def _extract_verified(where: str, tar: tarfile.TarFile, member: tarfile.TarInfo,
                      target: Path, relpath: str, manifest: Manifest) -> int:
    """Copy one member to ``target/relpath`` while hashing it; refuse it unless its size and
    sha256 are the manifest's."""
    entry = manifest.files[relpath]
    shown = f"{manifest.model_id}/{relpath}"
    if member.size != entry.bytes:
        raise ArtifactError(f"{where}: {shown} is {member.size} bytes, the manifest says "
                            f"{entry.bytes} (truncated or replaced); refusing the pack")
    dest = target.joinpath(*PurePosixPath(relpath).parts)
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    assert source is not None  # a plain file (checked)
    digest = hashlib.sha256()
    with dest.open("xb") as out:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != entry.sha256:
        raise ArtifactError(f"{where}: {shown}: sha256 does not match the manifest (modified "
                            "or corrupt); refusing the pack")
    return member.size


def _already_installed(repository: ModelRepository, manifest: Manifest
                       ) -> UnpackReport | None:
    """A report when the same model, with every shipped file intact, is already there (its
    TensorRT engines and device profiles are kept)."""
    if not repository.has_model(manifest.model_id):
        return None
    try:
        current = repository.load_manifest(manifest.model_id)
        if current.fingerprint != manifest.fingerprint:
            return None
        for relpath, entry in manifest.files.items():
            if current.files.get(relpath) != entry:
                return None
            repository.check_file(current, relpath)
    except (ManifestError, ArtifactError):
        return None
    size = sum(e.bytes for e in manifest.files.values())
    return UnpackReport(current, repository.model_dir(manifest.model_id),
                        len(manifest.files) + 1, size, None, True)


def _replace(repository: ModelRepository, manifest: Manifest, target: Path,
             work: Path) -> str | None:
    """Move ``target`` into place; returns the fingerprint of a different model replaced."""
    final = repository.model_dir(manifest.model_id)
    replaced = None
    if final.exists():
        try:
            old = repository.load_manifest(manifest.model_id).fingerprint
            replaced = old if old != manifest.fingerprint else None
        except (ManifestError, ArtifactError):
            replaced = "unreadable"
        trash = work / "old"
        final.rename(trash)
        target.rename(final)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        target.rename(final)
    return replaced
