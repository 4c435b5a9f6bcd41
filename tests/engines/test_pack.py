"""``armdi pack`` / ``armdi unpack``: a built model moves to another repository unchanged, and
an unpack refuses a pack that is tampered with, incomplete or unsafe, writing nothing."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from appliance.cli import main
from engines.errors import ArtifactError, ManifestError
from engines.manifest import FileEntry, Manifest, SegmentEntry
from engines.pack import pack, unpack
from engines.repository import MANIFEST, ModelRepository, sha256_file, write_json_atomic
from tests.conftest import BuiltModel, run_onnx, sample_batch


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()  # type: ignore[union-attr]
                if m.isfile()}


def _write_tar(path: Path, members: dict[str, bytes],
               extra: list[tarfile.TarInfo] | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return path


def _repo_files(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and ".staging" not in p.parts)


@pytest.fixture
def packed(built_tiny: BuiltModel, tmp_path: Path) -> Path:
    return pack(ModelRepository(built_tiny.repo), "tiny", tmp_path / "tiny.tar").path


def test_pack_then_unpack_gives_the_same_model(built_tiny: BuiltModel, packed: Path,
                                               tmp_path: Path) -> None:
    other = ModelRepository(tmp_path / "other")
    report = unpack(packed, other)
    assert not report.unchanged and report.replaced is None
    m = other.load_manifest("tiny")
    assert m.fingerprint == built_tiny.manifest.fingerprint
    for relpath in m.files:
        assert (other.model_dir("tiny") / relpath).read_bytes() == \
            (built_tiny.model_dir / relpath).read_bytes()
    other.check_all(m)
    x = sample_batch((1, 3, 8, 8))
    engine = other.open_engine(m, 0, m.blocks, fused=False)
    try:
        expected = run_onnx(built_tiny.model_dir / "model.onnx", x)[0]
        assert np.max(np.abs(engine.infer(x) - expected)) <= 1e-5
    finally:
        engine.close()
    assert not list((tmp_path / "other" / ".staging").iterdir())
    # The same pack again: nothing to do, and what the device added is kept.
    again = unpack(packed, other)
    assert again.unchanged


def test_pack_leaves_device_specific_engines_behind(built_tiny: BuiltModel,
                                                    tmp_path: Path) -> None:
    repo = ModelRepository(built_tiny.repo)
    m = repo.load_manifest("tiny")
    plan = built_tiny.model_dir / "trt" / "abc.engine"
    plan.parent.mkdir()
    plan.write_bytes(b"a TensorRT plan for one GPU")
    with_trt = m.model_copy(update={
        "segments": {**m.segments, "trt": (SegmentEntry(start=0, end=1, path="trt/abc.engine"),)},
        "files": {**m.files, "trt/abc.engine": FileEntry(sha256=sha256_file(plan),
                                                          bytes=plan.stat().st_size)}})
    write_json_atomic(built_tiny.model_dir / MANIFEST, with_trt.model_dump(mode="json"))
    members = _members(pack(repo, "tiny", tmp_path / "t.tar").path)
    assert not any("trt" in name for name in members)
    shipped = Manifest.model_validate_json(members["tiny/manifest.json"])
    assert set(shipped.segments) == {"ort"} and "trt/abc.engine" not in shipped.files
    assert shipped.fingerprint == m.fingerprint


def test_a_tampered_file_is_refused_by_name_and_nothing_is_installed(
        packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    members = _members(packed)
    name = "tiny/seg_0003_0004.onnx"
    data = bytearray(members[name])
    data[-1] ^= 0xFF  # same size, other bytes
    members[name] = bytes(data)
    bad = _write_tar(tmp_path / "bad.tar", members)
    target = tmp_path / "target"
    with pytest.raises(ArtifactError, match=r"tiny/seg_0003_0004\.onnx: sha256 does not match"):
        unpack(bad, ModelRepository(target))
    assert _repo_files(target) == []
    # Through the CLI: one error line naming the file, exit status 1.
    monkeypatch.setattr(sys, "argv", ["armdi", "unpack", str(bad), "--repo", str(target)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: {bad}: {name}: sha256 does not match the manifest (modified or corrupt); "
        "refusing the pack"]


def test_a_refused_pack_leaves_the_installed_model_alone(built_tiny: BuiltModel,
                                                         packed: Path, tmp_path: Path) -> None:
    members = _members(packed)
    members["tiny/weights.bin"] = members["tiny/weights.bin"][:-4]
    with pytest.raises(ArtifactError, match=r"tiny/weights\.bin is \d+ bytes, the manifest "):
        unpack(_write_tar(tmp_path / "short.tar", members), ModelRepository(built_tiny.repo))
    repo = ModelRepository(built_tiny.repo)
    repo.check_all(repo.load_manifest("tiny"))


@pytest.mark.parametrize("change", ["extra", "missing", "manifest", "fingerprint", "schema",
                                    "two_models", "no_manifest"])
def test_incomplete_or_inconsistent_packs_are_refused(packed: Path, tmp_path: Path,
                                                      change: str) -> None:
    members = _members(packed)
    manifest = json.loads(members["tiny/manifest.json"])
    expected = {
        "extra": (ArtifactError, r"tiny/notes\.txt is not listed"),
        "missing": (ArtifactError, r"tiny/seg_0000_0001\.onnx is missing from the pack"),
        "manifest": (ManifestError, r"not valid JSON"),
        "fingerprint": (ManifestError, r"does not match its content"),
        "schema": (ManifestError, r"schema version 1, this armdi reads version"),
        "two_models": (ArtifactError, r"one model folder, this one has 2"),
        "no_manifest": (ManifestError, r"not an armdi pack"),
    }[change]
    if change == "extra":
        members["tiny/notes.txt"] = b"hello"
    elif change == "missing":
        del members["tiny/seg_0000_0001.onnx"]
    elif change == "manifest":
        members["tiny/manifest.json"] = b"{not json"
    elif change == "fingerprint":
        manifest["preprocessing"]["resize"] = 300  # content changed, fingerprint kept
        members["tiny/manifest.json"] = json.dumps(manifest).encode()
    elif change == "schema":
        manifest["schema_version"] = 1
        members["tiny/manifest.json"] = json.dumps(manifest).encode()
    elif change == "two_models":
        members["other/model.onnx"] = b"x"
    elif change == "no_manifest":
        del members["tiny/manifest.json"]
    target = tmp_path / "target"
    with pytest.raises(expected[0], match=expected[1]):
        unpack(_write_tar(tmp_path / "bad.tar", members), ModelRepository(target))
    assert _repo_files(target) == []


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("unsafe", ["dotdot", "absolute", "symlink", "hardlink", "device",
                                    "nested_dotdot"])
def test_unsafe_members_are_refused_and_nothing_is_written(packed: Path, tmp_path: Path,
                                                          unsafe: str) -> None:
    members = _members(packed)
    extra: list[tarfile.TarInfo] = []
    if unsafe == "dotdot":
        members["../escaped.txt"] = b"owned"
    elif unsafe == "absolute":
        members[str(tmp_path / "escaped.txt")] = b"owned"
    elif unsafe == "nested_dotdot":
        members["tiny/../../escaped.txt"] = b"owned"
    elif unsafe == "symlink":
        extra.append(_link("tiny/weights.bin", str(tmp_path / "escaped.txt"), tarfile.SYMTYPE))
        del members["tiny/weights.bin"]
    elif unsafe == "hardlink":
        extra.append(_link("tiny/link", "/etc/passwd", tarfile.LNKTYPE))
    elif unsafe == "device":
        extra.append(_link("tiny/dev", "", tarfile.CHRTYPE))
    bad = _write_tar(tmp_path / "bad.tar", members, extra)
    target = tmp_path / "deep" / "target"
    with pytest.raises(ArtifactError, match=r"unsafe path|link|special file"):
        unpack(bad, ModelRepository(target))
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "deep" / "escaped.txt").exists()
    assert _repo_files(target) == []


def test_unpack_replaces_another_version_and_says_so(built_tiny: BuiltModel, packed: Path,
                                                     tmp_path: Path) -> None:
    from tests.conftest import other_version

    other_root = other_version(built_tiny, tmp_path)  # the same model id, other content
    other = ModelRepository(other_root)
    old = other.load_manifest("tiny").fingerprint
    report = unpack(packed, other)
    assert report.replaced == old
    assert other.load_manifest("tiny").fingerprint == built_tiny.manifest.fingerprint


def test_pack_and_unpack_errors(built_tiny: BuiltModel, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no such file"):
        unpack(tmp_path / "nothing.tar", ModelRepository(tmp_path / "r"))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(ArtifactError, match="not a readable tar file"):
        unpack(junk, ModelRepository(tmp_path / "r"))
    (built_tiny.model_dir / "seg_0001_0002.onnx").write_bytes(b"changed")
    with pytest.raises(ArtifactError, match=r"seg_0001_0002\.onnx"):
        pack(ModelRepository(built_tiny.repo), "tiny", tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()
    assert list(tmp_path.glob(".x.tar*")) == []
