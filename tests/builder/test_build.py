"""``builder.build.build``: an ONNX file in, a verified, profiled model directory out — or a
``BuildError`` and nothing half-built left where a node would look."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

import builder.build as build_mod
from builder.build import STAGING, BuildOptions, build
from engines.chained import ChainedEngine
from engines.errors import BuildError, ModelNotFoundError, VerificationError
from engines.manifest import SCHEMA_VERSION
from engines.ort import OrtEngine
from engines.repository import MANIFEST, ModelRepository, sha256_file
from tests.conftest import (
    CONSTANT_CUTS,
    RESIDUAL_CUTS,
    BuiltModel,
    build_tiny,
    reorder_nodes,
    residual_net,
    run_onnx,
    sample_batch,
    save,
)

K = len(RESIDUAL_CUTS) - 1


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _staging_entries(repo: Path) -> list[str]:
    return sorted(p.name for p in (repo / STAGING).iterdir())


# --- a good build ----------------------------------------------------------------------------


def test_build_writes_a_complete_manifest(built_tiny: BuiltModel) -> None:
    m = built_tiny.manifest
    assert m.model_id == "tiny"  # the file's stem
    assert m.blocks == K
    assert [c.name for c in m.cut_points] == list(RESIDUAL_CUTS)
    assert [c.index for c in m.cut_points] == list(range(K + 1))
    assert m.input.name == "input" and m.input.shape == (-1, 3, 8, 8)
    assert m.output.name == "output" and m.output.shape == (-1, 10)
    assert m.fingerprint == m.content_fingerprint()  # see tests/builder/test_fingerprint.py
    assert m.source.kind == "onnx" and m.source.weights == "file"
    assert m.labels is None  # ten outputs are not ImageNet's thousand classes
    assert m.segment_mode == "all"
    assert len(m.segments["ort"]) == K * (K + 1) // 2
    assert {(s.start, s.end) for s in m.segments["ort"]} == {
        (i, j) for i in range(K) for j in range(i + 1, K + 1)}
    v = m.verification
    assert v.passed and v.max_abs_error <= 1e-5 and v.tolerance == 1e-4
    assert v.max_relative_error is not None and v.max_relative_error <= 1e-5
    assert v.min_cosine is not None and v.min_cosine > 0.9999
    assert v.top1_agreement == 1.0 and v.segments_checked == K * (K + 1) // 2
    (profile,) = m.profiles.values()
    assert profile.backend == "ort" and profile.threads == 1
    assert len(profile.block_ms) == K and all(t > 0 for t in profile.block_ms)
    assert profile.full_model_ms > 0
    assert 0 < len(profile.segment_ms) <= 6
    assert all(int(key.split(":")[1]) - int(key.split(":")[0]) >= 2 for key in profile.segment_ms)


def test_manifest_lists_every_file_with_its_hash(built_tiny: BuiltModel) -> None:
    m = built_tiny.manifest
    on_disk = {p.name for p in built_tiny.model_dir.iterdir()} - {MANIFEST}
    assert set(m.files) == on_disk
    assert {m.full_model, m.weights_file} <= on_disk
    for name, entry in m.files.items():
        path = built_tiny.model_dir / name
        assert entry.bytes == path.stat().st_size and entry.sha256 == sha256_file(path)
    stored = json.loads((built_tiny.model_dir / MANIFEST).read_text())
    assert stored["schema_version"] == SCHEMA_VERSION and stored["model_id"] == "tiny"
    assert _staging_entries(built_tiny.repo) == []


def test_full_model_equals_the_chain_of_blocks(built_tiny: BuiltModel) -> None:
    repo = ModelRepository(built_tiny.repo)
    m = repo.load_manifest("tiny")
    repo.check_all(m)
    x = sample_batch((3, 3, 8, 8))
    (reference,) = run_onnx(residual_net(), x)
    full = OrtEngine(repo.model_dir("tiny") / m.full_model, 0, K)
    chain = repo.open_engine(m, 0, K, fused=False)
    fused = repo.open_engine(m, 0, K)
    assert isinstance(chain, ChainedEngine) and len(chain.engines) == K
    assert not isinstance(fused, ChainedEngine)
    for engine in (full, chain, fused):
        np.testing.assert_allclose(engine.infer(x), reference, rtol=0, atol=1e-5)
        engine.close()


def test_name_option_sets_the_model_id(tiny_onnx: Path, tmp_path: Path) -> None:
    repo, m = build_tiny(tiny_onnx, tmp_path / "repo", name="my-net.v1", segments="blocks")
    assert m.model_id == "my-net.v1"
    assert ModelRepository(repo).list_models() == ["my-net.v1"]


@pytest.mark.parametrize(("mode", "count"), [("blocks", K), ("window:2", 2 * K - 1),
                                             ("window:3", 3 * K - 3)])
def test_segment_modes(tiny_onnx: Path, tmp_path: Path, mode: str, count: int) -> None:
    repo, m = build_tiny(tiny_onnx, tmp_path / "repo", segments=mode)
    assert m.segment_mode == mode
    assert len(m.segments["ort"]) == count
    assert m.verification.passed and m.verification.segments_checked == count
    assert len(list(ModelRepository(repo).model_dir("tiny").glob("seg_*.onnx"))) == count
    # a segment that was not built runs as a chain of blocks, with the same result
    repository = ModelRepository(repo)
    engine = repository.open_engine(m, 2, 2 + 4)
    assert isinstance(engine, ChainedEngine)
    x = sample_batch((2, 3, 8, 8))
    (acts_in, acts_out) = run_onnx(residual_net(), x, [RESIDUAL_CUTS[2], RESIDUAL_CUTS[6]])
    np.testing.assert_allclose(engine.infer(acts_in), acts_out, rtol=0, atol=1e-5)


def test_max_blocks_merges_blocks(tiny_onnx: Path, tmp_path: Path) -> None:
    repo, m = build_tiny(tiny_onnx, tmp_path / "repo", max_blocks=4)
    assert m.blocks == 4 and len(m.cut_points) == 5
    names = [c.name for c in m.cut_points]
    assert names[0] == "input" and names[-1] == "output"
    assert [RESIDUAL_CUTS.index(n) for n in names] == sorted(RESIDUAL_CUTS.index(n) for n in names)
    assert [c.index for c in m.cut_points] == list(range(5))
    assert len(m.segments["ort"]) == 10 and m.verification.passed
    # the fine blocks measured for merging are not left behind
    assert len(list((repo / "tiny").glob("seg_*.onnx"))) == 10


def test_model_with_constant_subgraphs_builds(constant_onnx: Path, tmp_path: Path) -> None:
    _, m = build_tiny(constant_onnx, tmp_path / "repo")
    assert m.model_id == "consts"
    assert tuple(c.name for c in m.cut_points) == CONSTANT_CUTS
    assert m.verification.passed and m.verification.max_abs_error <= 1e-5


def test_rebuild_replaces_the_model(built_tiny: BuiltModel) -> None:
    before = json.loads((built_tiny.model_dir / MANIFEST).read_text())
    _, m = build_tiny(built_tiny.source, built_tiny.repo, segments="blocks")
    assert len(m.segments["ort"]) == K
    assert len(list(built_tiny.model_dir.glob("seg_*.onnx"))) == K
    assert before["segment_mode"] == "all" and m.segment_mode == "blocks"
    assert _staging_entries(built_tiny.repo) == []


# --- interrupted builds ----------------------------------------------------------------------


def test_interrupted_build_is_never_served_and_is_cleaned(tiny_onnx: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    stale = repo / STAGING / f"build-abc123-{_dead_pid()}"
    (stale / "tiny").mkdir(parents=True)
    (stale / "tiny" / "weights.bin").write_bytes(b"\0" * 1000)
    live = repo / STAGING / f"build-def456-{os.getpid()}"  # a build still running
    live.mkdir()
    half = repo / "tiny"
    half.mkdir()
    (half / "seg_0000_0001.onnx").write_bytes(b"partial")
    repository = ModelRepository(repo)
    assert repository.list_models() == [] and not repository.has_model("tiny")
    with pytest.raises(ModelNotFoundError, match=r"'tiny' is not in the repository.*armdi build"):
        repository.load_manifest("tiny")

    build_tiny(tiny_onnx, repo, segments="blocks")
    assert not stale.exists()
    assert live.exists()  # another builder's folder is left alone
    assert _staging_entries(repo) == [live.name]
    assert repository.list_models() == ["tiny"]
    repository.check_all(repository.load_manifest("tiny"))
    assert (half / "seg_0000_0001.onnx").read_bytes() != b"partial"


# --- bad inputs ------------------------------------------------------------------------------


def test_unwritable_repository(tiny_onnx: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "x" / "file"
    blocker.parent.mkdir()
    blocker.write_text("not a directory")
    with pytest.raises(BuildError, match=r"not writable.*--repo"):
        build(BuildOptions(model=str(tiny_onnx), repo=blocker / "repo"))


def test_corrupt_onnx_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(BuildError, match=r"broken.onnx: not a valid ONNX model"):
        build(BuildOptions(model=str(bad), repo=tmp_path / "repo"))
    assert _staging_entries(tmp_path / "repo") == []


def test_truncated_onnx_file(tiny_onnx: Path, tmp_path: Path) -> None:
    data = tiny_onnx.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BuildError, match=r"cut\.onnx"):
        build(BuildOptions(model=str(cut), repo=tmp_path / "repo"))


def test_missing_onnx_file(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"nothere.onnx: no such ONNX file"):
        build(BuildOptions(model=str(tmp_path / "nothere.onnx"), repo=tmp_path / "repo"))


def test_unknown_model_name(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"unknown model 'resnet9000'.*efficientnet_lite0"):
        build(BuildOptions(model="resnet9000", repo=tmp_path / "repo"))


def test_two_input_model_is_refused(two_input_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="exactly one input tensor, found 2"):
        build(BuildOptions(model=str(two_input_onnx), repo=tmp_path / "repo"))
    assert _staging_entries(tmp_path / "repo") == []
    assert ModelRepository(tmp_path / "repo").list_models() == []


def test_unsorted_onnx_file_builds_like_the_sorted_one(tmp_path: Path) -> None:
    """onnx.checker refuses a file whose nodes are stored out of topological order; the
    build sorts them first, then finds the same cuts and the same outputs."""
    model = residual_net()
    backwards = save(reorder_nodes(model, list(range(len(model.graph.node)))[::-1]),
                     tmp_path / "backwards.onnx")
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(str(backwards))
    repo, manifest = build_tiny(backwards, tmp_path / "repo", segments="blocks")
    assert [c.name for c in manifest.cut_points] == list(RESIDUAL_CUTS)
    assert manifest.verification.passed
    full = repo / "backwards" / manifest.full_model
    onnx.checker.check_model(str(full))  # what the build wrote is sorted
    x = sample_batch((2, 3, 8, 8))
    np.testing.assert_allclose(run_onnx(full, x)[0], run_onnx(model, x)[0], rtol=0, atol=1e-5)


def test_a_file_that_is_invalid_when_sorted_is_still_refused(tmp_path: Path) -> None:
    model = residual_net()
    model.graph.node[0].op_type = "NoSuchOp"
    backwards = save(reorder_nodes(model, list(range(len(model.graph.node)))[::-1]),
                     tmp_path / "bad.onnx")
    with pytest.raises(BuildError, match=r"bad\.onnx: not a valid ONNX model.*NoSuchOp"):
        build(BuildOptions(model=str(backwards), repo=tmp_path / "repo"))


def test_bad_options_fail_before_any_work(tiny_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="--segments 'some'"):
        build(BuildOptions(model=str(tiny_onnx), repo=tmp_path / "r1", segments="some"))
    with pytest.raises(BuildError, match="--backend 'cuda'"):
        build(BuildOptions(model=str(tiny_onnx), repo=tmp_path / "r2", backend="cuda"))
    with pytest.raises(BuildError, match="invalid model id"):
        build(BuildOptions(model=str(tiny_onnx), repo=tmp_path / "r3", name="../escape"))
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


class _NoisyEngine(OrtEngine):
    """Block 3's engine is off by 1e-3: what a miscompiled segment would look like."""

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        out = super()._infer_impl(x)
        if self.path.name == "seg_0003_0004.onnx":
            out = out + np.float32(1e-3)
        return out


def test_verification_failure_leaves_no_model(tiny_onnx: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_mod, "OrtEngine", _NoisyEngine)
    repo = tmp_path / "repo"
    with pytest.raises(VerificationError,
                       match=r"verification failed: relative error .* in .*\(tolerance 0.0001 "
                             r"of the output's scale"):
        build_tiny(tiny_onnx, repo, segments="window:2")
    assert not (repo / "tiny").exists()
    assert _staging_entries(repo) == []
    with pytest.raises(ModelNotFoundError):
        ModelRepository(repo).load_manifest("tiny")


def test_verification_failure_keeps_the_previous_build(built_tiny: BuiltModel,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_mod, "OrtEngine", _NoisyEngine)
    with pytest.raises(VerificationError):
        build_tiny(built_tiny.source, built_tiny.repo, segments="blocks")
    repository = ModelRepository(built_tiny.repo)
    m = repository.load_manifest("tiny")
    assert m.segment_mode == "all"
    repository.check_all(m)


def test_built_segments_are_valid_onnx(built_tiny: BuiltModel) -> None:
    for entry in built_tiny.manifest.segments["ort"][:12]:
        onnx.checker.check_model(str(built_tiny.model_dir / entry.path))
