"""The ONNX Runtime engine and the chained engine on tiny generated models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from builder.graph import analyse
from builder.segments import WEIGHTS_FILE, externalize, extract, segment_filename, value_infos
from engines.base import Engine, TensorSpec
from engines.chained import ChainedEngine
from engines.errors import EngineError, InputSpecError
from engines.ort import OrtEngine, default_providers, session_options
from tests.conftest import RESIDUAL_CUTS, residual_net, run_onnx, sample_batch, save

K = len(RESIDUAL_CUTS) - 1


@pytest.fixture(scope="module")
def segments_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The residual net as model.onnx plus its blocks and segment [0, K), sharing weights."""
    out = tmp_path_factory.mktemp("ort")
    model = residual_net()
    analysis = analyse(model)
    infos = value_infos(model)
    light = externalize(model, out / WEIGHTS_FILE)
    onnx.save(light, str(out / "model.onnx"))
    for i, j in [(k, k + 1) for k in range(K)] + [(0, K), (2, 5)]:
        onnx.save(extract(light, analysis, infos, i, j), str(out / segment_filename(i, j)))
    return out


@pytest.fixture(scope="module")
def activations() -> list[np.ndarray]:
    return run_onnx(residual_net(), sample_batch((3, 3, 8, 8)), list(RESIDUAL_CUTS))


def test_engine_specs_and_result(segments_dir: Path, activations: list[np.ndarray]) -> None:
    engine = OrtEngine(segments_dir / segment_filename(2, 5), 2, 5)
    assert isinstance(engine, Engine)
    assert engine.backend == "ort" and engine.label == "ort[2,5)"
    assert engine.input_spec == TensorSpec("a0", (-1, 48, 8, 8), "float32")
    assert engine.output_spec == TensorSpec("cat", (-1, 48, 8, 8), "float32")
    assert engine.input_spec.bytes_per_sample == 48 * 64 * 4
    np.testing.assert_allclose(engine.infer(activations[2]), activations[5], rtol=0, atol=1e-5)


def test_without_prepacking_the_result_is_the_same(segments_dir: Path,
                                                    activations: list[np.ndarray]) -> None:
    """The builder's verification opens engines without pre-packed weights (fast to open,
    weights mapped from the file); they compute the same function."""
    opts = session_options(prepacking=False)
    assert opts.get_session_config_entry("session.disable_prepacking") == "1"
    engine = OrtEngine(segments_dir / segment_filename(2, 5), 2, 5, prepacking=False)
    np.testing.assert_allclose(engine.infer(activations[2]), activations[5], rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_dynamic_batch(segments_dir: Path, activations: list[np.ndarray], batch: int) -> None:
    engine = OrtEngine(segments_dir / "model.onnx", 0, K)
    out = engine.infer(activations[0][:batch])
    assert out.shape == (batch, 10)
    np.testing.assert_allclose(out, activations[-1][:batch], rtol=0, atol=1e-5)


def test_non_contiguous_input_is_accepted(segments_dir: Path,
                                          activations: list[np.ndarray]) -> None:
    engine = OrtEngine(segments_dir / segment_filename(0, 1), 0, 1)
    x = np.asfortranarray(activations[0])
    assert not x.flags.c_contiguous
    np.testing.assert_allclose(engine.infer(x), activations[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((1, 3, 8, 8), np.float64), "expected dtype float32"),
        (np.zeros((1, 3, 8, 9), np.float32), r"expected shape \('N', 3, 8, 8\)"),
        (np.zeros((3, 8, 8), np.float32), "expected shape"),
        (np.zeros((0, 3, 8, 8), np.float32), "empty batch"),
    ],
)
def test_bad_inputs_are_refused(segments_dir: Path, array: np.ndarray, message: str) -> None:
    engine = OrtEngine(segments_dir / segment_filename(0, 1), 0, 1)
    with pytest.raises(InputSpecError, match=rf"ort\[0,1\): {message}.*'input'"):
        engine.infer(array)


def test_unloadable_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not protobuf")
    with pytest.raises(EngineError, match=r"bad.onnx: onnxruntime could not load the segment"):
        OrtEngine(bad, 0, 1)


def test_segment_without_its_weights_file(segments_dir: Path, tmp_path: Path) -> None:
    lonely = tmp_path / "seg.onnx"
    lonely.write_bytes((segments_dir / segment_filename(0, 1)).read_bytes())
    with pytest.raises(EngineError, match=r"seg\.onnx: onnxruntime could not load"):
        OrtEngine(lonely, 0, 1)


def test_close_is_idempotent_and_infer_after_close_fails(segments_dir: Path,
                                                        activations: list[np.ndarray]) -> None:
    engine = OrtEngine(segments_dir / segment_filename(0, 1), 0, 1)
    engine.close()
    engine.close()
    with pytest.raises(EngineError, match="inference failed"):
        engine.infer(activations[0])


def test_context_manager_closes(segments_dir: Path, activations: list[np.ndarray]) -> None:
    with OrtEngine(segments_dir / segment_filename(0, 1), 0, 1) as engine:
        engine.infer(activations[0])
    with pytest.raises(EngineError):
        engine.infer(activations[0])


def test_chain_of_blocks_equals_the_fused_segment(segments_dir: Path,
                                                  activations: list[np.ndarray]) -> None:
    blocks = [OrtEngine(segments_dir / segment_filename(k, k + 1), k, k + 1) for k in range(K)]
    chain = ChainedEngine(blocks)
    fused = OrtEngine(segments_dir / segment_filename(0, K), 0, K)
    assert (chain.start, chain.end) == (0, K) and chain.backend == "chain(ort)"
    assert chain.input_spec == fused.input_spec and chain.output_spec == fused.output_spec
    np.testing.assert_allclose(chain.infer(activations[0]), fused.infer(activations[0]),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(chain.infer(activations[0]), activations[-1], rtol=0, atol=1e-5)
    chain.close()
    with pytest.raises(EngineError):
        blocks[3].infer(activations[3])


def test_chain_refuses_engines_that_do_not_meet(segments_dir: Path) -> None:
    first = OrtEngine(segments_dir / segment_filename(0, 1), 0, 1)
    third = OrtEngine(segments_dir / segment_filename(2, 3), 2, 3)
    with pytest.raises(ValueError, match=r"do not chain: \[0,1\) then \[2,3\)"):
        ChainedEngine([first, third])
    with pytest.raises(ValueError, match="at least one engine"):
        ChainedEngine([])


def test_session_options_turn_spinning_off() -> None:
    opts = session_options(threads=3)
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(spinning=True).get_session_config_entry(
        "session.intra_op.allow_spinning") == "1"
    assert session_options(threads=0).intra_op_num_threads == 1


def test_cpu_provider_on_request() -> None:
    assert default_providers("cpu") == ["CPUExecutionProvider"]
    assert default_providers()[-1] == "CPUExecutionProvider"


def test_bad_range_is_refused(segments_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"bad segment \[3, 3\)"):
        OrtEngine(segments_dir / segment_filename(0, 1), 3, 3)


def test_int64_output_dtype(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ArgMax", ["input"], ["output"], axis=1, keepdims=0)]
    model = helper.make_model(helper.make_graph(
        nodes, "argmax", [helper.make_tensor_value_info("input", 1, ["N", 5])],
        [helper.make_tensor_value_info("output", TensorProto.INT64, ["N"])]),
        opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    engine = OrtEngine(save(model, tmp_path / "argmax.onnx"), 0, 1)
    assert engine.output_spec.dtype == "int64"
    x = np.eye(5, dtype=np.float32)[[3, 1]]
    np.testing.assert_array_equal(engine.infer(x), [3, 1])
