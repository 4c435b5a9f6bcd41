"""The model fingerprint is a content hash: the same model gives the same fingerprint wherever
and however it was exported, and another computation gives another."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from engines.errors import ManifestError
from engines.manifest import SCHEMA_VERSION, Manifest
from engines.repository import MANIFEST, ModelRepository
from tests.conftest import BuiltModel, build_tiny, residual_net, save, with_export_metadata


def _exported_at(path: Path, checkout: str, producer_version: str, seed: int = 0) -> Path:
    return save(with_export_metadata(residual_net(seed), checkout, producer_version),
                path / "tiny.onnx")


def _build(source: Path, repo: Path, **options: object) -> Manifest:
    return build_tiny(source, repo, **{"segments": "blocks", **options})[1]


def test_same_model_from_two_checkouts_gives_the_same_fingerprint(tmp_path: Path) -> None:
    a = _exported_at(tmp_path / "a", "/home/alice/armdi", "2.14.0")
    b = _exported_at(tmp_path / "elsewhere" / "b", "/opt/checkouts/armdi-2", "2.14.1")
    assert a.read_bytes() != b.read_bytes()
    first = _build(a, tmp_path / "repo-a")
    second = _build(b, tmp_path / "repo-b", segments="all", profile_repeats=1)
    assert first.fingerprint == second.fingerprint
    assert first.fingerprint == first.content_fingerprint()
    stored_a = (tmp_path / "repo-a" / "tiny" / "model.onnx").read_bytes()
    assert stored_a == (tmp_path / "repo-b" / "tiny" / "model.onnx").read_bytes()
    stored = onnx.load_from_string(stored_a)
    assert "alice" not in str(stored) and not stored.metadata_props
    assert stored.producer_version == ""
    # Whatever the build did besides the model: profiles, timestamps, segments built.
    assert first.profiles != second.profiles or first.created != second.created \
        or first.segment_mode != second.segment_mode


def test_other_weights_or_blocks_give_another_fingerprint(tmp_path: Path) -> None:
    base = _build(save(residual_net(0), tmp_path / "a" / "tiny.onnx"), tmp_path / "r0")
    weights = _build(save(residual_net(1), tmp_path / "b" / "tiny.onnx"), tmp_path / "r1")
    merged = _build(save(residual_net(0), tmp_path / "c" / "tiny.onnx"), tmp_path / "r2",
                    max_blocks=4)
    assert len({base.fingerprint, weights.fingerprint, merged.fingerprint}) == 3


def test_fingerprint_covers_graph_weights_layout_and_preprocessing(
        built_tiny: BuiltModel) -> None:
    m = built_tiny.manifest
    files = dict(m.files)
    graph = files[m.full_model]
    changed = [
        m.model_copy(update={"files": {**files, m.full_model: graph.model_copy(
            update={"sha256": "0" * 64})}}),
        m.model_copy(update={"files": {**files, m.weights_file: graph}}),
        m.model_copy(update={"cut_points": m.cut_points[:-2] + m.cut_points[-1:]}),
        m.model_copy(update={"preprocessing": m.preprocessing.model_copy(
            update={"resize": 300})}),
    ]
    assert all(c.content_fingerprint() != m.fingerprint for c in changed)
    same = [
        m.model_copy(update={"profiles": {}, "created": "2000-01-01T00:00:00+00:00",
                             "armdi_version": "9.9.9", "labels": ("a",) * 10,
                             "segments": {"ort": m.segments["ort"][:3]}}),
        m.model_copy(update={"source": m.source.model_copy(update={"name": "/else/x.onnx"})}),
    ]
    assert all(c.content_fingerprint() == m.fingerprint for c in same)


def _rewrite(built: BuiltModel, change: dict[str, object]) -> Path:
    path = built.model_dir / MANIFEST
    data = json.loads(path.read_text())
    data.update(change)
    path.write_text(json.dumps(data))
    return path


def test_a_manifest_whose_fingerprint_does_not_match_its_content_is_refused(
        built_tiny: BuiltModel) -> None:
    _rewrite(built_tiny, {"fingerprint": "ab" * 32})
    with pytest.raises(ManifestError, match=r"fingerprint abababababab does not match.*"
                                            r"armdi build"):
        ModelRepository(built_tiny.repo).load_manifest("tiny")


def test_a_repository_of_the_old_schema_asks_for_a_rebuild(built_tiny: BuiltModel) -> None:
    _rewrite(built_tiny, {"schema_version": 1})
    with pytest.raises(ManifestError) as err:
        ModelRepository(built_tiny.repo).load_manifest("tiny")
    text = str(err.value)
    assert f"schema version 1, this armdi reads version {SCHEMA_VERSION}" in text
    assert "rebuild: armdi build" in text and "unpack" in text


def test_profile_for_prefers_this_device_and_backend(built_tiny: BuiltModel) -> None:
    m = built_tiny.manifest
    [mine] = m.profiles.values()
    other = mine.model_copy(update={"device": "jetson-orin", "block_ms": (9.0,) * m.blocks})
    trt = mine.model_copy(update={"backend": "trt", "block_ms": (0.5,) * m.blocks})
    both = m.model_copy(update={"profiles": {"o": other, "t": trt, "m": mine}})
    assert both.profile_for(mine.device, "ort") is mine
    assert both.profile_for(mine.device, "trt") is trt
    assert both.profile_for("jetson-orin", "trt") is other  # its own, though for ONNX Runtime
    assert both.profile_for("unknown", "ort") is other  # any, until this device profiles
    assert m.model_copy(update={"profiles": {}}).profile_for(mine.device, "ort") is None
