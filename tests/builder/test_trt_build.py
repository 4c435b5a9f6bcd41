"""TensorRT engine building: keys, cache files, op checks, parser errors, rebuilds, and the
build configuration as the fake ``tensorrt`` of ``tests/engines/test_trt.py`` records it.
The ``trt``-marked test at the end builds and runs a real engine where TensorRT imports."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builder.trt_build import (
    FP32_TOLERANCE,
    Agreement,
    TrtBuilder,
    TrtBuildOptions,
    check_dla,
    check_ops,
    engine_filename,
    engine_key,
    load_or_build,
    max_opset_for,
    parser_build_error,
    profile_shapes,
    timing_cache_path,
    unsupported_ops_for,
    verify_against,
    write_atomic,
)
from engines.base import BaseEngine, TensorSpec
from engines.errors import BackendUnavailableError, BuildError, EngineError, VerificationError
from engines.trt import DeviceSignature, TrtEngine, TrtSession
from tests.engines.test_trt import CACHE_MAGIC, fake_session, tiny_model
from tests.engines.test_trt import FakeParserError as Trt8Error

ORIN = DeviceSignature("Orin", (8, 7), "8.5.2")
FINGERPRINT = "ab" * 32


# --- options, keys, file names ------------------------------------------------------------


def test_options_validate() -> None:
    assert TrtBuildOptions().precision == "fp32"
    assert TrtBuildOptions(fp16=True).precision == "fp16"
    for bad in ({"max_batch": 0}, {"workspace_mb": 0}, {"dla_core": -1, "fp16": True}):
        with pytest.raises(ValueError):
            TrtBuildOptions(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="DLA runs FP16"):
        TrtBuildOptions(dla_core=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrtBuildOptions().fp16 = True  # type: ignore[misc]


def test_engine_key_is_stable_and_short() -> None:
    key = engine_key(FINGERPRINT, 0, 3, ORIN, TrtBuildOptions())
    assert key == engine_key(FINGERPRINT, 0, 3, ORIN, TrtBuildOptions())
    assert re.fullmatch(r"[0-9a-f]{24}", key)
    # Pinned: changing the key scheme invalidates every engine users have built.
    assert key == "57b0da77622d6cc606ad4791"


@pytest.mark.parametrize(
    "change",
    [
        lambda a: {**a, "fingerprint": "cd" * 32},
        lambda a: {**a, "start": 1},
        lambda a: {**a, "end": 4},
        lambda a: {**a, "device": dataclasses.replace(ORIN, trt_version="8.5.3")},
        lambda a: {**a, "device": dataclasses.replace(ORIN, gpu_name="Xavier")},
        lambda a: {**a, "device": dataclasses.replace(ORIN, compute_capability=(7, 2))},
        lambda a: {**a, "options": TrtBuildOptions(fp16=True)},
        lambda a: {**a, "options": TrtBuildOptions(max_batch=16)},
        lambda a: {**a, "options": TrtBuildOptions(fp16=True, dla_core=0)},
        lambda a: {**a, "onnx_sha256": "ef" * 32},
    ],
    ids=["fingerprint", "start", "end", "trt", "gpu", "cc", "fp16", "max_batch", "dla",
         "onnx_sha256"],
)
def test_engine_key_changes_with_every_field(
    change: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    base: dict[str, Any] = {"fingerprint": FINGERPRINT, "start": 0, "end": 3, "device": ORIN,
                            "options": TrtBuildOptions()}
    assert engine_key(**change(base)) != engine_key(**base)


def test_engine_key_ignores_build_time_only_options(tmp_path: Path) -> None:
    plain = engine_key(FINGERPRINT, 0, 3, ORIN, TrtBuildOptions())
    tuned = TrtBuildOptions(workspace_mb=4096, timing_cache=tmp_path / "x.cache")
    assert engine_key(FINGERPRINT, 0, 3, ORIN, tuned) == plain
    assert engine_key(FINGERPRINT, 0, 3, ORIN, TrtBuildOptions(dla_core=0, fp16=True)) != \
        engine_key(FINGERPRINT, 0, 3, ORIN, TrtBuildOptions(dla_core=1, fp16=True))
    with pytest.raises(ValueError):
        engine_key(FINGERPRINT, 3, 3, ORIN, TrtBuildOptions())


def test_engine_filename() -> None:
    key = engine_key(FINGERPRINT, 0, 3, ORIN, TrtBuildOptions())
    assert engine_filename(key) == f"{key}.engine"
    for bad in ("", "../../etc/passwd", key.upper(), key[:-1], key + "0"):
        with pytest.raises(ValueError):
            engine_filename(bad)


def test_timing_cache_path_is_one_per_device(tmp_path: Path) -> None:
    path = timing_cache_path(tmp_path, ORIN)
    assert path.parent == tmp_path and path.name == "timing-orin-sm87-trt8.5.2.cache"
    assert timing_cache_path(tmp_path, ORIN) == path
    others = {timing_cache_path(tmp_path, dataclasses.replace(ORIN, **change))
              for change in ({"gpu_name": "Xavier"}, {"compute_capability": (7, 2)},
                             {"trt_version": "10.3.0"})}
    assert path not in others and len(others) == 3


def test_write_atomic_replaces_whole_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "sub" / "file.bin"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"

    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"three")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


# --- load or build ------------------------------------------------------------------------

KEY = "0123456789abcdef01234567"


class Recorder:
    def __init__(self, good: bytes = b"engine-v2") -> None:
        self.good = good
        self.builds = 0
        self.notes: list[str] = []

    def build(self) -> bytes:
        self.builds += 1
        return self.good

    def deserialize(self, data: bytes) -> str:
        if data != self.good:
            raise EngineError("deserialize_cuda_engine returned None")
        return "loaded"


def test_load_or_build_builds_when_missing(tmp_path: Path) -> None:
    rec = Recorder()
    result = load_or_build(tmp_path, KEY, rec.build, rec.deserialize, rec.notes.append)
    assert (result.built, result.loaded, rec.builds) == (True, "loaded", 1)
    assert result.path == tmp_path / f"{KEY}.engine" and result.path.read_bytes() == b"engine-v2"
    assert rec.notes == []


def test_load_or_build_reuses_an_engine_that_loads(tmp_path: Path) -> None:
    rec = Recorder()
    (tmp_path / f"{KEY}.engine").write_bytes(b"engine-v2")
    result = load_or_build(tmp_path, KEY, rec.build, rec.deserialize, rec.notes.append)
    assert (result.built, rec.builds, result.note) == (False, 0, "reused")


def test_load_or_build_rebuilds_an_engine_that_no_longer_loads(tmp_path: Path) -> None:
    rec = Recorder()
    (tmp_path / f"{KEY}.engine").write_bytes(b"engine-from-jetpack-5")
    result = load_or_build(tmp_path, KEY, rec.build, rec.deserialize, rec.notes.append)
    assert (result.built, rec.builds) == (True, 1)
    assert result.path.read_bytes() == b"engine-v2"
    assert len(rec.notes) == 1 and "does not load" in rec.notes[0] and "rebuilding" in rec.notes[0]
    assert "does not load" in result.note


def test_load_or_build_fails_when_the_new_engine_does_not_load(tmp_path: Path) -> None:
    rec = Recorder()
    with pytest.raises(BuildError, match="just built"):
        load_or_build(tmp_path, KEY, lambda: b"garbage", rec.deserialize, rec.notes.append)


def test_load_or_build_does_not_hide_other_errors(tmp_path: Path) -> None:
    (tmp_path / f"{KEY}.engine").write_bytes(b"x")

    def broken(data: bytes) -> None:
        raise TypeError("a bug, not a stale engine")

    with pytest.raises(TypeError):
        load_or_build(tmp_path, KEY, lambda: b"x", broken)


# --- opsets and ops -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "opset"),
    [("8.5.2", 17), ("8.5.2.2", 17), ("8.6.1", 17), ("8.6.2.3", 17), ("10.0.1", 20),
     ("10.3.0", 20), ("10.14.1", 20), ("10.15.1", 24), ("10.20.0", 24)],
)
def test_max_opset_for(version: str, opset: int) -> None:
    assert max_opset_for(version) == opset


def test_max_opset_for_rejects_junk_and_old_versions() -> None:
    with pytest.raises(ValueError):
        max_opset_for("junk")
    with pytest.raises(BackendUnavailableError):
        max_opset_for("8.4.3")


def test_unsupported_op_tables() -> None:
    assert "LayerNormalization" in unsupported_ops_for("8.5.2")
    assert "LayerNormalization" not in unsupported_ops_for("8.6.1")
    assert {"Unique", "NonMaxSuppression"} & unsupported_ops_for("8.6.1") == {"Unique"}
    assert {"BitwiseAnd", "StringSplit", "Unique"} <= unsupported_ops_for("10.3.0")
    assert unsupported_ops_for("8.6.1") <= unsupported_ops_for("8.5.2")
    for common in ("Conv", "Relu", "Gemm", "Resize", "HardSwish"):
        assert common not in unsupported_ops_for("8.5.2") | unsupported_ops_for("10.3.0")


def small_model(nodes: list[onnx.NodeProto], opset: int = 17,
                input_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", input_type, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_check_ops_passes_a_plain_model() -> None:
    model = small_model([helper.make_node("Relu", ["x"], ["y"], name="relu")])
    for version in ("8.5.2", "8.6.1", "10.3.0"):
        assert check_ops(model, version) == []


def test_check_ops_opset_limits() -> None:
    model = small_model([helper.make_node("Relu", ["x"], ["y"])], opset=18)  # torch dynamo
    problems = check_ops(model, "8.6.1")
    assert len(problems) == 1
    assert "opset 18" in problems[0] and "TensorRT 8.6 parses up to opset 17" in problems[0]
    assert check_ops(model, "10.3.0") == []
    assert "opset 21" in check_ops(small_model([helper.make_node("Relu", ["x"], ["y"])],
                                               opset=21), "10.3.0")[0]


def test_check_ops_names_unsupported_ops_and_nodes() -> None:
    nodes = [helper.make_node("Unique", ["x"], [f"u{i}"], name=f"unique_{i}") for i in range(5)]
    nodes.append(helper.make_node("LayerNormalization", ["x", "x"], ["y"], name="ln"))
    problems = check_ops(small_model(nodes), "8.5.2")
    assert "TensorRT 8.5 cannot import LayerNormalization: node 'ln'" in problems
    assert "TensorRT 8.5 cannot import Unique: node 'unique_0', 'unique_1', 'unique_2' and " \
           "2 more" in problems
    assert check_ops(small_model(nodes), "8.6.1") == [
        "TensorRT 8.6 cannot import Unique: node 'unique_0', 'unique_1', 'unique_2' and 2 more"
    ]


def test_check_ops_looks_inside_subgraphs_custom_domains_maxpool_and_strings() -> None:
    body = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["z"], name="inner_unique")], "then",
        [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("If", ["c"], ["y"], name="branch", then_branch=body, else_branch=body),
        helper.make_node("MyOp", ["x"], ["m"], name="custom", domain="com.example"),
        helper.make_node("MaxPool", ["x"], ["p", "idx"], name="pool", kernel_shape=[2]),
    ]
    problems = " | ".join(check_ops(small_model(nodes, input_type=TensorProto.STRING), "10.3.0"))
    assert "Unique: node 'inner_unique'" in problems
    assert "com.example::MyOp (custom domain, needs a plugin): node 'custom'" in problems
    assert "MaxPool with an Indices output: node 'pool'" in problems
    assert "no string tensors: x" in problems


# --- parser errors ------------------------------------------------------------------------


class Trt10Error(Trt8Error):  # 10.x parser errors also name the node and its operator
    def node_name(self) -> str:
        return "/features/ln"

    def node_operator(self) -> str:
        return "LayerNormalization"


class FakeParser:
    def __init__(self, errors: list[Any]) -> None:
        self.errors = errors

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> Any:
        return self.errors[index]


def test_parser_errors_name_file_node_and_message() -> None:
    parser = FakeParser([Trt8Error("No importer registered for op: Unique\n", 1),
                         Trt8Error("Assertion failed: weights", -1)])
    error = parser_build_error(parser, Path("/repo/seg_3_5.onnx"),
                               [("conv", "Conv"), ("uniq", "Unique")])
    assert isinstance(error, BuildError)
    assert str(error) == (
        "TensorRT cannot parse /repo/seg_3_5.onnx: node 1 'uniq' (Unique): UNSUPPORTED_NODE: "
        "No importer registered for op: Unique; UNSUPPORTED_NODE: Assertion failed: weights"
    )


def test_parser_errors_prefer_tensorrt10_node_details() -> None:
    error = parser_build_error(FakeParser([Trt10Error("bad epsilon", 7)]), Path("s.onnx"))
    assert "node 7 '/features/ln' (LayerNormalization): UNSUPPORTED_NODE: bad epsilon" in \
        str(error)
    assert "\n" not in str(error)


def test_parser_errors_without_details() -> None:
    assert str(parser_build_error(FakeParser([]), Path("s.onnx"))) == \
        "TensorRT cannot parse s.onnx: the parser gave no reason"


# --- profiles and DLA ---------------------------------------------------------------------


def test_profile_shapes() -> None:
    assert profile_shapes((-1, 3, 224, 224), 8, dla=False) == (
        (1, 3, 224, 224), (1, 3, 224, 224), (8, 3, 224, 224))
    assert profile_shapes((-1, 96), 4, dla=True) == ((4, 96), (4, 96), (4, 96))
    with pytest.raises(BuildError, match="no dynamic batch"):
        profile_shapes((1, 3, 8, 8), 8, dla=False)
    with pytest.raises(BuildError, match="only the batch axis"):
        profile_shapes((-1, 3, -1, -1), 8, dla=False)


def test_check_dla() -> None:
    check_dla(None, 0)
    check_dla(1, 2)
    with pytest.raises(BuildError, match="no DLA"):
        check_dla(0, 0)
    with pytest.raises(BuildError, match=r"cores 0\.\.1"):
        check_dla(2, 2)


# --- the builder over the fake tensorrt ---------------------------------------------------


@pytest.fixture
def fake(tmp_path: Path) -> Any:
    session, trt = fake_session("10.3.0")
    onnx_path = tmp_path / "seg_0_1.onnx"
    tiny_model(onnx_path)
    yield session, trt, onnx_path
    session.close()


def test_builder_configures_the_build(fake: Any, tmp_path: Path) -> None:
    session, trt, onnx_path = fake
    engines = tmp_path / "trt"
    builder = TrtBuilder(session, TrtBuildOptions(max_batch=6, workspace_mb=256), engines)
    built = builder.build_segment(onnx_path, fingerprint=FINGERPRINT, start=0, end=1)
    assert built.built and built.path == engines / engine_filename(built.key)
    assert built.key == engine_key(FINGERPRINT, 0, 1, session.device, builder.options)
    [config] = trt.builds
    assert "TF32" not in config.flags and "FP16" not in config.flags
    assert config.pool_limits == {"WORKSPACE": 256 << 20}
    assert config.profiles[0].shapes == {
        "x": ((1, 3, 16, 16), (1, 3, 16, 16), (6, 3, 16, 16))}
    assert built.io.max_batch == 6 and built.io.input.shape == (-1, 3, 16, 16)
    entry = built.to_segment_entry(tmp_path)
    assert (entry.path, entry.precision, entry.key) == (f"trt/{built.key}.engine", "fp32",
                                                        built.key)


def test_builder_shares_one_timing_cache_across_builds(fake: Any, tmp_path: Path) -> None:
    session, trt, onnx_path = fake
    builder = TrtBuilder(session, TrtBuildOptions(), tmp_path / "trt")
    for start, end in ((0, 1), (1, 2), (0, 2)):
        builder.build_segment(onnx_path, fingerprint=FINGERPRINT, start=start, end=end)
    cache = timing_cache_path(tmp_path / "trt", session.device)
    assert cache.read_bytes() == CACHE_MAGIC + b"3"  # each build saw the previous entries
    assert len(trt.builds) == 3


def test_builder_replaces_a_stale_timing_cache(
    fake: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    session, _, onnx_path = fake
    stale = tmp_path / "stale.cache"
    stale.write_bytes(b"a cache from TensorRT 8.5")
    builder = TrtBuilder(session, TrtBuildOptions(timing_cache=stale), tmp_path)
    with caplog.at_level(logging.WARNING):
        builder.build_segment(onnx_path, fingerprint=FINGERPRINT, start=0, end=1)
    assert "starting a new one" in caplog.text
    assert stale.read_bytes() == CACHE_MAGIC + b"1"


def test_builder_reuses_and_rebuilds_engines(fake: Any, tmp_path: Path) -> None:
    session, trt, onnx_path = fake
    builder = TrtBuilder(session, TrtBuildOptions(), tmp_path)
    first = builder.build_segment(onnx_path, fingerprint=FINGERPRINT, start=0, end=1)
    again = builder.build_segment(onnx_path, fingerprint=FINGERPRINT, start=0, end=1)
    assert (again.built, len(trt.builds)) == (False, 1)
    first.path.write_bytes(b"engine from the previous JetPack")
    notes: list[str] = []
    rebuilt = builder.build_segment(onnx_path, fingerprint=FINGERPRINT, start=0, end=1,
                                    note=notes.append)
    assert rebuilt.built and len(trt.builds) == 2 and "rebuilding" in notes[0]
    engine = TrtEngine.load(rebuilt.path, start=0, end=1, session=session,
                            refit_from=onnx_path)
    x = np.ones((2, 3, 16, 16), np.float32)
    np.testing.assert_allclose(engine.infer(x), 3 * x)
    engine.close()


def test_builder_fp16_and_dla(fake: Any, tmp_path: Path) -> None:
    session, trt, onnx_path = fake
    with pytest.raises(BuildError, match="no DLA"):
        TrtBuilder(session, TrtBuildOptions(fp16=True, dla_core=0), tmp_path)
    trt.dla_cores = 2
    builder = TrtBuilder(session, TrtBuildOptions(fp16=True, dla_core=1, max_batch=4), tmp_path)
    built = builder.build_segment(onnx_path, fingerprint=FINGERPRINT, start=0, end=1)
    [config] = trt.builds
    assert {"FP16", "GPU_FALLBACK"} <= config.flags and "TF32" not in config.flags
    assert (config.default_device_type, config.DLA_core) == ("DLA", 1)
    assert config.profiles[0].shapes["x"] == ((4, 3, 16, 16),) * 3
    assert built.precision == "fp16"


# --- weight-stripped plans (TensorRT 10) ----------------------------------------------------


def external_model(directory: Path) -> Path:
    """``tiny_model`` whose weights live in ``weights.bin`` beside it, as segment files do."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "seg_0000_0001.onnx"
    tiny_model(path)
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    return path


def test_tensorrt_10_builds_stripped_plans_8_cannot(tmp_path: Path) -> None:
    assert TrtBuildOptions().stripped_for("10.3.0") and not TrtBuildOptions().stripped_for("8.6.1")
    assert not TrtBuildOptions(strip=False).stripped_for("10.3.0")
    with pytest.raises(BuildError, match=r"TensorRT 8\.6\.1 cannot build weight-stripped plans"):
        TrtBuildOptions(strip=True).stripped_for("8.6.1")
    ten = dataclasses.replace(ORIN, trt_version="10.3.0")
    assert engine_key(FINGERPRINT, 0, 3, ten, TrtBuildOptions()) != \
        engine_key(FINGERPRINT, 0, 3, ten, TrtBuildOptions(strip=False))
    for version, stripped in (("10.3.0", True), ("8.5.2", False)):
        session, trt = fake_session(version)
        onnx_path = external_model(tmp_path / version)
        try:
            built = TrtBuilder(session, TrtBuildOptions(), tmp_path / version).build_segment(
                onnx_path, fingerprint=FINGERPRINT, start=0, end=1)
        finally:
            session.close()
        [config] = trt.builds
        assert built.stripped is stripped
        assert ({"STRIP_PLAN", "REFIT_IDENTICAL"} <= config.flags) is stripped
    session, _ = fake_session("8.5.2")
    try:
        with pytest.raises(BuildError, match="cannot build weight-stripped"):
            TrtBuilder(session, TrtBuildOptions(strip=True), tmp_path)
    finally:
        session.close()


def test_a_stripped_plan_is_refitted_from_its_onnx_file(tmp_path: Path) -> None:
    session, trt = fake_session("10.3.0")
    onnx_path = external_model(tmp_path / "model")
    x = np.ones((2, 3, 16, 16), np.float32)
    try:
        built = TrtBuilder(session, TrtBuildOptions(), tmp_path / "trt").build_segment(
            onnx_path, fingerprint=FINGERPRINT, start=0, end=1)
        with pytest.raises(EngineError, match="weight-stripped plan and needs its segment"):
            TrtEngine.load(built.path, start=0, end=1, session=session)
        engine = TrtEngine.load(built.path, start=0, end=1, session=session,
                                refit_from=onnx_path)
        np.testing.assert_allclose(engine.infer(x), 3 * x)
        engine.close()
        assert trt.refits == [str(onnx_path)]
        (onnx_path.parent / "weights.bin").unlink()  # the shared weights went missing
        with pytest.raises(EngineError, match="cannot refit the weights from"):
            TrtEngine.load(built.path, start=0, end=1, session=session, refit_from=onnx_path)
        # A full plan needs no refit and ignores where it could come from.
        full = TrtBuilder(session, TrtBuildOptions(strip=False), tmp_path / "trt")
        plain = full.build_segment(onnx_path, fingerprint=FINGERPRINT, start=0, end=1)
        assert not plain.stripped and plain.path != built.path
        engine = TrtEngine.load(plain.path, start=0, end=1, session=session,
                                refit_from=onnx_path)
        np.testing.assert_allclose(engine.infer(x), 3 * x)
        engine.close()
        assert len(trt.refits) == 1
    finally:
        session.close()


@pytest.mark.parametrize(("version", "flags"), [("8.5.2", 1), ("10.3.0", 0)])
def test_builder_network_flags_per_version(tmp_path: Path, version: str, flags: int) -> None:
    session, trt = fake_session(version)
    onnx_path = tmp_path / "m.onnx"
    tiny_model(onnx_path)
    try:
        TrtBuilder(session, TrtBuildOptions(), tmp_path).build_segment(
            onnx_path, fingerprint=FINGERPRINT, start=0, end=1)
    finally:
        session.close()
    assert [network.flags for network in trt.networks] == [flags]  # EXPLICIT_BATCH only in 8


def test_builder_maps_parser_errors(fake: Any, tmp_path: Path) -> None:
    session, trt, onnx_path = fake
    trt.parser_rejects = {"Relu"}
    builder = TrtBuilder(session, TrtBuildOptions(), tmp_path)
    with pytest.raises(BuildError) as info:
        builder.build_segment(onnx_path, fingerprint=FINGERPRINT, start=0, end=1)
    assert str(info.value) == (
        f"TensorRT cannot parse {onnx_path}: node 1 'relu' (Relu): UNSUPPORTED_NODE: "
        "No importer registered for Relu"
    )
    assert not list(tmp_path.glob("*.engine"))


def test_builder_checks_ops_before_building(tmp_path: Path) -> None:
    session, trt = fake_session("8.5.2")
    onnx_path = tmp_path / "m.onnx"
    onnx.save(small_model([helper.make_node("LayerNormalization", ["x", "x"], ["y"],
                                            name="ln")]), str(onnx_path))
    try:
        with pytest.raises(BuildError, match=r"m\.onnx: TensorRT 8\.5 cannot import "
                                             r"LayerNormalization: node 'ln'"):
            TrtBuilder(session, TrtBuildOptions(), tmp_path).build_segment(
                onnx_path, fingerprint=FINGERPRINT, start=0, end=1)
    finally:
        session.close()
    assert trt.builds == []


# --- verification against a reference engine ---------------------------------------------


class NumpyEngine(BaseEngine):
    """A test engine: ``x @ weights`` (+ ``noise``), on numpy."""

    backend = "numpy"

    def __init__(
        self, weights: np.ndarray, noise: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> None:
        super().__init__(0, 1, TensorSpec("x", (-1, weights.shape[0])),
                         TensorSpec("y", (-1, weights.shape[1])))
        self.weights = weights
        self.noise = noise

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        y: np.ndarray = (x @ self.weights).astype(np.float32)
        return y + self.noise(y) if self.noise else y


WEIGHTS = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)
SAMPLES = [np.random.default_rng(i).standard_normal((4, 8)).astype(np.float32) for i in range(3)]


def test_verify_identical_engines() -> None:
    result = verify_against(NumpyEngine(WEIGHTS), NumpyEngine(WEIGHTS), SAMPLES, "fp32")
    assert result == Agreement(0.0, 1.0)
    max_err, top1 = result
    assert (max_err, top1) == (0.0, 1.0)


def test_verify_fp32_tolerance() -> None:
    close = NumpyEngine(WEIGHTS, lambda y: np.full_like(y, FP32_TOLERANCE / 2))
    assert verify_against(NumpyEngine(WEIGHTS), close, SAMPLES, "fp32").max_abs_error == \
        pytest.approx(FP32_TOLERANCE / 2, rel=1e-3)
    far = NumpyEngine(WEIGHTS, lambda y: np.full_like(y, 2 * FP32_TOLERANCE))
    with pytest.raises(VerificationError, match=r"max abs error 0\.002 .* exceeds 0\.001"):
        verify_against(NumpyEngine(WEIGHTS), far, SAMPLES, "fp32")


def flip_first_sample(y: np.ndarray) -> np.ndarray:
    """Noise that changes the argmax of the first sample of each batch."""
    noise = np.zeros_like(y)
    noise[0, y[0].argmin()] = y[0].max() - y[0].min() + 1
    return noise


def test_verify_fp16_top1_on_the_final_segment() -> None:
    flipped = NumpyEngine(WEIGHTS, flip_first_sample)
    with pytest.raises(VerificationError, match=r"top-1 agrees .* on 75\.0% of 12 samples"):
        verify_against(NumpyEngine(WEIGHTS), flipped, SAMPLES, "fp16")
    result = verify_against(NumpyEngine(WEIGHTS), flipped, SAMPLES, "fp16", min_top1=0.75)
    assert result.top1_agreement == pytest.approx(9 / 12)
    # An intermediate fp16 segment is only required to be finite.
    loose = NumpyEngine(WEIGHTS, lambda y: np.full_like(y, 0.05))
    assert verify_against(NumpyEngine(WEIGHTS), loose, SAMPLES[0], "fp16",
                          final_segment=False).max_abs_error == pytest.approx(0.05)


def test_verify_rejects_nan_shape_mismatch_and_bad_arguments() -> None:
    nan = NumpyEngine(WEIGHTS, lambda y: np.full_like(y, np.nan))
    with pytest.raises(VerificationError, match="NaN"):
        verify_against(NumpyEngine(WEIGHTS), nan, SAMPLES, "fp16", final_segment=False)
    narrow = NumpyEngine(WEIGHTS[:, :4])
    with pytest.raises(VerificationError, match="shape"):
        verify_against(NumpyEngine(WEIGHTS), narrow, SAMPLES, "fp32")
    with pytest.raises(ValueError):
        verify_against(NumpyEngine(WEIGHTS), NumpyEngine(WEIGHTS), SAMPLES, "int8")
    with pytest.raises(ValueError):
        verify_against(NumpyEngine(WEIGHTS), NumpyEngine(WEIGHTS), [], "fp32")


# --- on a real GPU ------------------------------------------------------------------------


class OrtEngine(BaseEngine):
    """ONNX Runtime on the CPU, the reference TensorRT is compared with."""

    backend = "ort"

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        super().__init__(0, 1, TensorSpec("x", (-1, 3, 16, 16)), TensorSpec("y", (-1, 10)))

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        result: np.ndarray = self.session.run(None, {"x": x})[0]
        return result


@pytest.fixture(scope="module")
def gpu_session() -> Any:
    pytest.importorskip("tensorrt", reason="TensorRT is not available on this machine")
    pytest.importorskip("pycuda.driver", reason="pycuda is not available on this machine")
    session = TrtSession.start()
    yield session
    session.close()


@pytest.mark.trt
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_gpu_build_and_run_matches_onnxruntime(gpu_session: TrtSession, tmp_path: Path,
                                              fp16: bool) -> None:
    onnx_path = tmp_path / "tiny.onnx"
    tiny_model(onnx_path)
    options = TrtBuildOptions(fp16=fp16, max_batch=4)
    builder = TrtBuilder(gpu_session, options, tmp_path / "trt")
    built = builder.build_segment(onnx_path, fingerprint=FINGERPRINT, start=0, end=1)
    assert built.built and timing_cache_path(tmp_path / "trt", gpu_session.device).exists()
    engine = TrtEngine.load(built.path, start=0, end=1, session=gpu_session)
    try:
        rng = np.random.default_rng(1)
        inputs = [rng.standard_normal((n, 3, 16, 16)).astype(np.float32) for n in (1, 4, 7)]
        result = verify_against(OrtEngine(onnx_path), engine, inputs, options.precision)
        if not fp16:
            assert result.max_abs_error <= FP32_TOLERANCE
    finally:
        engine.close()
    # A stale engine file (e.g. from another JetPack) is rebuilt, not served.
    built.path.write_bytes(b"not an engine")
    again = builder.build_segment(onnx_path, fingerprint=FINGERPRINT, start=0, end=1)
    assert again.built



@pytest.mark.trt
def test_gpu_stripped_plan_is_small_and_refits_to_match_onnxruntime(
    gpu_session: TrtSession, tmp_path: Path
) -> None:
    if not gpu_session.device.trt_version.startswith("10"):
        pytest.skip(f"TensorRT {gpu_session.device.trt_version} cannot strip plans (needs 10)")
    onnx_path = external_model(tmp_path / "model")
    stripped = TrtBuilder(gpu_session, TrtBuildOptions(max_batch=4), tmp_path / "trt")
    full = TrtBuilder(gpu_session, TrtBuildOptions(max_batch=4, strip=False), tmp_path / "trt")
    small = stripped.build_segment(onnx_path, fingerprint=FINGERPRINT, start=0, end=1)
    big = full.build_segment(onnx_path, fingerprint=FINGERPRINT, start=0, end=1)
    assert small.stripped and not big.stripped
    assert small.path.stat().st_size < big.path.stat().st_size
    engine = TrtEngine.load(small.path, start=0, end=1, session=gpu_session,
                            refit_from=onnx_path)
    try:
        rng = np.random.default_rng(2)
        inputs = [rng.standard_normal((n, 3, 16, 16)).astype(np.float32) for n in (1, 4)]
        result = verify_against(OrtEngine(onnx_path), engine, inputs, "fp32")
        assert result.max_abs_error <= FP32_TOLERANCE
    finally:
        engine.close()
    with pytest.raises(EngineError):  # a stripped plan without its weights is not served
        TrtEngine.load(small.path, start=0, end=1, session=gpu_session)
