"""Cut tensors the builder has to look at twice: ones that lost the batch axis (ConvNeXt's
and Swin's pooling, as the dynamo exporter writes it) and ones whose shape ONNX shape
inference cannot fold (a constant chain), which are read from one run of the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.graph import analyse, drop_cuts
from builder.segments import resolve_cut_shapes, tensor_shape, value_infos
from engines.errors import BuildError
from tests.conftest import (
    CONSTANT_CUTS,
    RESIDUAL_CUTS,
    build_tiny,
    constant_net,
    residual_net,
    run_onnx,
    sample_batch,
    save,
)

C = 16


def flattened_pool_net(seed: int = 0) -> onnx.ModelProto:
    """A static batch-1 net whose global pooling goes through a tensor without a batch axis,
    as torch's dynamo exporter writes ``adaptive_avg_pool2d`` of a channels-last tensor:
    ``ReduceMean -> Reshape to (C,) -> Gather back to (1, C, 1, 1)``. The ``(C,)`` tensor is
    the only live tensor between two parts of the graph, but not an activation."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((C, 3, 3, 3)).astype(np.float32) / 5, "w"),
        numpy_helper.from_array(rng.standard_normal((10, C)).astype(np.float32) / 4, "fc_w"),
        numpy_helper.from_array(np.array([C], np.int64), "flat_shape"),
        numpy_helper.from_array(np.arange(C, dtype=np.int64).reshape(1, C, 1, 1), "strided"),
        numpy_helper.from_array(np.array([1, C], np.int64), "view_shape"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "hw"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("ReduceMean", ["relu", "hw"], ["mean"], keepdims=1),
        helper.make_node("Reshape", ["mean", "flat_shape"], ["flat"]),
        helper.make_node("Gather", ["flat", "strided"], ["as_strided"]),
        helper.make_node("Reshape", ["as_strided", "view_shape"], ["view"]),
        helper.make_node("Gemm", ["view", "fc_w"], ["output"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "flattened_pool",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def constant_chain_net(batch: int | str = "N") -> onnx.ModelProto:
    """``constant_net`` with ``Constant -> Identity -> Reshape``: shape inference leaves the
    reshaped tensor's shape unknown, although it is static."""
    model = constant_net()
    graph = model.graph
    reshape = next(n for n in graph.node if n.op_type == "Reshape")
    reshape.input[1] = "shape_copy"
    index = list(graph.node).index(reshape)
    graph.node.insert(index, helper.make_node("Identity", ["shape_const"], ["shape_copy"]))
    for vi in (graph.input[0], graph.output[0]):
        dim = vi.type.tensor_type.shape.dim[0]
        dim.Clear()
        if isinstance(batch, int):
            dim.dim_value = batch
        else:
            dim.dim_param = batch
    return model


def test_drop_cuts_joins_the_blocks_on_either_side() -> None:
    analysis = analyse(residual_net())
    joined = drop_cuts(analysis, {2, 3})  # a0 and r1_add
    assert joined.cuts == tuple(c for k, c in enumerate(RESIDUAL_CUTS) if k not in (2, 3))
    remap = {0: 0, 1: 1, 2: 1, 3: 1, **{b: b - 2 for b in range(4, 11)}}
    assert joined.node_block == tuple(remap[b] if b >= 0 else -1 for b in analysis.node_block)
    with pytest.raises(BuildError, match="always cut points"):
        drop_cuts(analysis, {0})


def test_a_cut_without_batch_axis_is_joined_into_its_neighbours(tmp_path: Path) -> None:
    model = flattened_pool_net()
    assert "flat" in analyse(model).cuts  # a dominator, but (16,) has no batch axis
    source = save(model, tmp_path / "pool.onnx")
    repo, manifest = build_tiny(source, tmp_path / "repo", segments="all")
    assert [c.name for c in manifest.cut_points] == [
        "input", "conv", "relu", "mean", "as_strided", "view", "output"]
    assert all(c.shape[0] == 1 for c in manifest.cut_points)
    assert manifest.verification.passed
    # the chain of block files equals the model
    x = sample_batch((1, 3, 8, 8))
    y = x
    for k in range(manifest.blocks):
        y = run_onnx(repo / "pool" / f"seg_{k:04d}_{k + 1:04d}.onnx", y)[0]
    np.testing.assert_allclose(y, run_onnx(model, x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", ["N", 1])
def test_shapes_shape_inference_cannot_fold_are_read_from_a_run(tmp_path: Path,
                                                                 batch: int | str) -> None:
    model = constant_chain_net(batch)
    analysis = analyse(model)
    assert analysis.cuts == CONSTANT_CUTS
    infos = value_infos(model)
    assert tensor_shape(infos["flat"]) == (-1, -1)  # inference gave up here
    source = save(model, tmp_path / "chain.onnx")
    assert "flat" in resolve_cut_shapes(source, analysis, infos)
    assert tensor_shape(infos["flat"])[1:] == (128,)
    first = -1 if batch == "N" else 1
    _, manifest = build_tiny(source, tmp_path / "repo", segments="blocks")
    shapes = {c.name: c.shape for c in manifest.cut_points}
    assert shapes["flat"] == shapes["scaled"] == (first, 128)
    assert shapes["fc"] == (first, 10)
    assert manifest.verification.passed


def test_a_dynamic_image_size_is_still_refused_when_shapes_are_read_from_a_run(
        tmp_path: Path) -> None:
    model = constant_chain_net()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    source = save(model, tmp_path / "chain.onnx")
    with pytest.raises(BuildError, match=r"dynamic non-batch dimension.*fixed input height"):
        resolve_cut_shapes(source, analyse(model), value_infos(model))
