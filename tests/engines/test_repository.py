"""The model repository: what a node may load, and the error it gets for each kind of damage.

Every error names the file and says to rebuild; each is its own ``ModelRepositoryError``
subclass so callers can tell them apart."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from engines.chained import ChainedEngine
from engines.errors import (
    ArtifactError,
    EngineError,
    ManifestError,
    ModelNotFoundError,
    ModelRepositoryError,
)
from engines.manifest import SCHEMA_VERSION, Manifest
from engines.ort import OrtEngine
from engines.repository import MANIFEST, ModelRepository, write_json_atomic
from tests.conftest import RESIDUAL_CUTS, BuiltModel, residual_net, run_onnx, sample_batch

K = len(RESIDUAL_CUTS) - 1
SEGMENT = "seg_0002_0005.onnx"


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite_manifest(built: BuiltModel, change: dict[str, object]) -> Path:
    path = built.model_dir / MANIFEST
    data = json.loads(path.read_text())
    data.update(change)
    path.write_text(json.dumps(data))
    return path


def test_repository_lists_and_loads_built_models(tiny_repo: tuple[Path, Manifest]) -> None:
    root, manifest = tiny_repo
    repo = ModelRepository(root)
    assert repo.list_models() == ["tiny"] and repo.has_model("tiny")
    m = repo.load_manifest("tiny")
    assert m == manifest
    assert m.activation_bytes()[0] == 3 * 8 * 8 * 4
    assert m.segment("ort", 2, 5) is not None and m.segment("trt", 2, 5) is None
    repo.check_all(m)


def test_open_engine_fused_or_chained(built_tiny: BuiltModel) -> None:
    repo = ModelRepository(built_tiny.repo)
    m = repo.load_manifest("tiny")
    x = sample_batch((2, 3, 8, 8))
    acts = run_onnx(residual_net(), x, list(RESIDUAL_CUTS))
    fused = repo.open_engine(m, 2, 5)
    chained = repo.open_engine(m, 2, 5, fused=False)
    single = repo.open_engine(m, 4, 5, fused=False)
    assert isinstance(fused, OrtEngine) and (fused.start, fused.end) == (2, 5)
    assert isinstance(chained, ChainedEngine)
    assert [(e.start, e.end) for e in chained.engines] == [(2, 3), (3, 4), (4, 5)]
    assert isinstance(single, OrtEngine)
    for engine, (i, j) in ((fused, (2, 5)), (chained, (2, 5)), (single, (4, 5))):
        assert engine.input_spec.name == RESIDUAL_CUTS[i]
        assert engine.output_spec.name == RESIDUAL_CUTS[j]
        np.testing.assert_allclose(engine.infer(acts[i]), acts[j], rtol=0, atol=1e-5)
        engine.close()


def test_open_engine_refuses_bad_ranges_and_backends(built_tiny: BuiltModel) -> None:
    repo = ModelRepository(built_tiny.repo)
    m = repo.load_manifest("tiny")
    for start, end in ((0, 0), (3, 2), (-1, 1), (0, K + 1)):
        with pytest.raises(ArtifactError, match="outside the model's 11 blocks"):
            repo.open_engine(m, start, end)
    with pytest.raises(ArtifactError, match=r"no trt engine for block \[0, 1\).*--backend trt"):
        repo.open_engine(m, 0, 2, backend="trt")


def test_unknown_model(tmp_path: Path, built_tiny: BuiltModel) -> None:
    with pytest.raises(ModelNotFoundError, match=r"'other' is not in the repository.*tiny"):
        ModelRepository(built_tiny.repo).load_manifest("other")
    with pytest.raises(ModelNotFoundError, match=r"built: none.*armdi build resnet18 --repo"):
        ModelRepository(tmp_path / "empty").load_manifest("resnet18")
    assert ModelRepository(tmp_path / "empty").list_models() == []


# --- damage ------------------------------------------------------------------------------------


def _assert_names_file_and_rebuild(err: pytest.ExceptionInfo[ModelRepositoryError],
                                   path: Path, source_known: bool = True) -> None:
    message = str(err.value)
    assert str(path) in message
    if source_known:  # the model came from an ONNX file: rebuild from that file, under its id
        assert re.search(r"rebuild: armdi build \S+tiny\.onnx --name tiny --repo \S+", message)
    else:  # the manifest is unreadable: only the model id is known
        assert re.search(r"rebuild: armdi build tiny --repo \S+", message)
    assert "\n" not in message


def test_tampered_segment(built_tiny: BuiltModel) -> None:
    path = built_tiny.model_dir / SEGMENT
    _flip_byte(path, path.stat().st_size // 2)
    repo = ModelRepository(built_tiny.repo)
    m = repo.load_manifest("tiny")
    with pytest.raises(ArtifactError, match="sha256 does not match") as err:
        repo.open_engine(m, 2, 5)
    _assert_names_file_and_rebuild(err, path)
    # the blocks are intact: the same range still runs chained
    repo.open_engine(m, 2, 5, fused=False).close()


def test_tampered_weights(built_tiny: BuiltModel) -> None:
    path = built_tiny.model_dir / "weights.bin"
    _flip_byte(path, 100)
    repo = ModelRepository(built_tiny.repo)
    with pytest.raises(ArtifactError, match="sha256 does not match") as err:
        repo.open_engine(repo.load_manifest("tiny"), 0, 1)
    _assert_names_file_and_rebuild(err, path)


def test_tampering_after_a_check_is_caught(built_tiny: BuiltModel) -> None:
    """Checks are cached per (path, size, mtime): rewriting a file invalidates its entry."""
    repo = ModelRepository(built_tiny.repo)
    m = repo.load_manifest("tiny")
    repo.open_engine(m, 2, 5).close()
    path = built_tiny.model_dir / SEGMENT
    stat = path.stat()
    _flip_byte(path, 10)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        repo.open_engine(m, 2, 5)


def test_truncated_segment(built_tiny: BuiltModel) -> None:
    path = built_tiny.model_dir / SEGMENT
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    repo = ModelRepository(built_tiny.repo)
    with pytest.raises(ArtifactError, match=rf"{size // 2} bytes, the manifest says {size}") as err:
        repo.open_engine(repo.load_manifest("tiny"), 2, 5)
    _assert_names_file_and_rebuild(err, path)


def test_missing_segment(built_tiny: BuiltModel) -> None:
    path = built_tiny.model_dir / SEGMENT
    path.unlink()
    repo = ModelRepository(built_tiny.repo)
    m = repo.load_manifest("tiny")
    with pytest.raises(ArtifactError, match="missing") as err:
        repo.open_engine(m, 2, 5)
    _assert_names_file_and_rebuild(err, path)
    with pytest.raises(ArtifactError, match="missing"):
        repo.check_all(m)


def test_missing_weights(built_tiny: BuiltModel) -> None:
    path = built_tiny.model_dir / "weights.bin"
    path.unlink()
    repo = ModelRepository(built_tiny.repo)
    with pytest.raises(ArtifactError, match="missing") as err:
        repo.open_engine(repo.load_manifest("tiny"), 0, 1)
    _assert_names_file_and_rebuild(err, path)


def test_file_not_in_the_manifest(built_tiny: BuiltModel) -> None:
    repo = ModelRepository(built_tiny.repo)
    m = repo.load_manifest("tiny")
    with pytest.raises(ArtifactError, match="not listed in the manifest") as err:
        repo.check_file(m, "extra.onnx")
    _assert_names_file_and_rebuild(err, built_tiny.model_dir / "extra.onnx")


def test_manifest_of_another_schema_version(built_tiny: BuiltModel) -> None:
    path = _rewrite_manifest(built_tiny, {"schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(ManifestError,
                       match=rf"schema version {SCHEMA_VERSION + 1}, this armdi reads version "
                             rf"{SCHEMA_VERSION}") as err:
        ModelRepository(built_tiny.repo).load_manifest("tiny")
    _assert_names_file_and_rebuild(err, path)


def test_manifest_without_a_schema_version(built_tiny: BuiltModel) -> None:
    path = built_tiny.model_dir / MANIFEST
    path.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(ManifestError, match="schema version None") as err:
        ModelRepository(built_tiny.repo).load_manifest("tiny")
    _assert_names_file_and_rebuild(err, path, source_known=False)


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00garbage"])
def test_unreadable_manifest(built_tiny: BuiltModel, content: bytes) -> None:
    path = built_tiny.model_dir / MANIFEST
    path.write_bytes(content)
    with pytest.raises(ManifestError, match="unreadable manifest") as err:
        ModelRepository(built_tiny.repo).load_manifest("tiny")
    _assert_names_file_and_rebuild(err, path, source_known=False)


def test_manifest_that_does_not_validate(built_tiny: BuiltModel) -> None:
    path = _rewrite_manifest(built_tiny, {"blocks": "many"})
    with pytest.raises(ManifestError, match="blocks: ") as err:
        ModelRepository(built_tiny.repo).load_manifest("tiny")
    _assert_names_file_and_rebuild(err, path)


def test_damaged_segment_that_passes_its_hash_fails_to_load(built_tiny: BuiltModel) -> None:
    """A segment whose manifest entry was updated with it still has to load: EngineError."""
    repo = ModelRepository(built_tiny.repo)
    path = built_tiny.model_dir / SEGMENT
    path.write_bytes(b"not an onnx file")
    data = json.loads((built_tiny.model_dir / MANIFEST).read_text())
    from engines.repository import sha256_file

    data["files"][SEGMENT] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    write_json_atomic(built_tiny.model_dir / MANIFEST, data)
    with pytest.raises(EngineError, match=rf"{SEGMENT}: onnxruntime could not load"):
        repo.open_engine(repo.load_manifest("tiny"), 2, 5)


def test_every_repository_error_is_a_model_repository_error() -> None:
    for cls in (ModelNotFoundError, ManifestError, ArtifactError):
        assert issubclass(cls, ModelRepositoryError)
    assert len({ModelNotFoundError, ManifestError, ArtifactError}) == 3


def test_write_json_atomic_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
