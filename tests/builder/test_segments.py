"""Segments: every [i, j) equals the full model between its cut points; all of them share one
weights file; which segments to build; merging blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from builder.graph import GraphAnalysis, analyse
from builder.segments import (
    INLINE_LIMIT,
    WEIGHTS_FILE,
    cut_points,
    externalize,
    extract,
    merge_blocks,
    segment_filename,
    segment_ranges,
    value_infos,
)
from engines.errors import BuildError
from tests.conftest import (
    RESIDUAL_CUTS,
    BuiltModel,
    constant_net,
    dead_branch_net,
    reorder_nodes,
    residual_net,
    run_onnx,
    sample_batch,
)

TOLERANCE = 1e-5


def _write_segments(model: onnx.ModelProto, out: Path,
                    analysis: GraphAnalysis | None = None) -> tuple[GraphAnalysis, list[Path]]:
    """Externalize ``model`` into ``out`` and write every segment; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    analysis = analysis or analyse(model)
    infos = value_infos(model)
    light = externalize(model, out / WEIGHTS_FILE)
    onnx.save(light, str(out / "model.onnx"))
    paths = []
    for i in range(analysis.blocks):
        for j in range(i + 1, analysis.blocks + 1):
            path = out / segment_filename(i, j)
            onnx.save(extract(light, analysis, infos, i, j), str(path))
            paths.append(path)
    return analysis, paths


def _check_every_segment(model: onnx.ModelProto, out: Path,
                         analysis: GraphAnalysis | None = None) -> int:
    analysis, paths = _write_segments(model, out, analysis)
    x = sample_batch(tuple(d.dim_value or 2 for d in
                           model.graph.input[0].type.tensor_type.shape.dim))
    reference = run_onnx(model, x, list(analysis.cuts))
    checked = 0
    for path in paths:
        i, j = (int(p) for p in path.stem.split("_")[1:])
        onnx.checker.check_model(str(path))
        seg = onnx.load(str(path), load_external_data=False)
        assert seg.graph.input[0].name == analysis.cuts[i]
        assert seg.graph.output[0].name == analysis.cuts[j]
        # the batch axis stays dynamic in and out
        for vi in (seg.graph.input[0], seg.graph.output[0]):
            assert not vi.type.tensor_type.shape.dim[0].HasField("dim_value"), path.name
        (got,) = run_onnx(path, reference[i])
        np.testing.assert_allclose(got, reference[j], rtol=0, atol=TOLERANCE,
                                   err_msg=f"segment [{i}, {j})")
        checked += 1
    return checked


def test_every_segment_of_the_residual_net_equals_the_full_model(tmp_path: Path) -> None:
    assert _check_every_segment(residual_net(), tmp_path) == 11 * 12 // 2


def test_every_segment_of_a_net_with_constant_subgraphs(tmp_path: Path) -> None:
    model = constant_net()
    assert _check_every_segment(model, tmp_path) == 6 * 7 // 2
    # the segment with the Reshape carries its own copy of the constant shape
    reshape_block = onnx.load(str(tmp_path / segment_filename(2, 3)), load_external_data=False)
    assert [n.op_type for n in reshape_block.graph.node] == ["Constant", "Reshape"]
    # the segment that scales carries the whole constant subgraph (Constant, Mul) and the
    # initializer it reads
    scale_block = onnx.load(str(tmp_path / segment_filename(3, 4)), load_external_data=False)
    assert [n.op_type for n in scale_block.graph.node] == ["Constant", "Mul", "Mul"]
    assert len(scale_block.graph.initializer) == 1
    # both segments that need the constant "two" have it
    for i, j in ((3, 4), (5, 6)):
        seg = onnx.load(str(tmp_path / segment_filename(i, j)), load_external_data=False)
        assert "two" in {t for n in seg.graph.node for t in n.output}
    # and the first block, which needs no constant, carries none
    first = onnx.load(str(tmp_path / segment_filename(0, 1)), load_external_data=False)
    assert [n.op_type for n in first.graph.node] == ["Conv"]


def test_segments_from_a_shuffled_file_equal_the_full_model(tmp_path: Path) -> None:
    model = residual_net()
    backwards = reorder_nodes(model, list(range(len(model.graph.node)))[::-1])
    analysis, paths = _write_segments(backwards, tmp_path)
    x = sample_batch((2, 3, 8, 8))
    reference = run_onnx(model, x, list(RESIDUAL_CUTS))
    for i, j in ((0, 11), (2, 5), (4, 5)):
        seg_path = tmp_path / segment_filename(i, j)
        onnx.checker.check_model(str(seg_path))
        (got,) = run_onnx(seg_path, reference[i])
        np.testing.assert_allclose(got, reference[j], rtol=0, atol=TOLERANCE)
    assert len(paths) == 66 and analysis.cuts == RESIDUAL_CUTS


def test_dead_branch_is_left_out_of_every_segment(tmp_path: Path) -> None:
    _, paths = _write_segments(dead_branch_net(), tmp_path)
    for path in paths:
        seg = onnx.load(str(path), load_external_data=False)
        outputs = {t for n in seg.graph.node for t in n.output}
        assert not outputs & {"dead_mul", "dead_sig", "dead_inner"}, path.name


def test_all_segments_share_one_weights_file(tmp_path: Path) -> None:
    model = residual_net()
    _, paths = _write_segments(model, tmp_path)
    weights = (tmp_path / WEIGHTS_FILE).read_bytes()
    originals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    big = {n for n, a in originals.items() if a.nbytes > INLINE_LIMIT}
    assert len(big) == 9  # every convolution, the stem's bias and the classifier's matrix
    assert sum(originals[n].nbytes for n in big) <= len(weights) < sum(
        originals[n].nbytes for n in big) + 64 * len(big)
    by_content = {originals[n].tobytes(): n for n in big}
    for path in [tmp_path / "model.onnx", *paths]:
        seg = onnx.load(str(path), load_external_data=False)
        for init in seg.graph.initializer:
            if init.data_location == TensorProto.EXTERNAL:
                info = {e.key: e.value for e in init.external_data}
                assert info["location"] == WEIGHTS_FILE
                offset, length = int(info["offset"]), int(info["length"])
                assert offset % 64 == 0
                assert weights[offset:offset + length] in by_content, path.name
            else:
                assert len(init.raw_data) <= INLINE_LIMIT, (path.name, init.name)
                assert not init.float_data
    # the full model file refers to the weights, with no byte of them inline
    assert (tmp_path / "model.onnx").stat().st_size < 4096


def test_externalized_model_equals_the_source(tmp_path: Path) -> None:
    model = residual_net()
    light = externalize(model, tmp_path / WEIGHTS_FILE)
    onnx.save(light, str(tmp_path / "model.onnx"))
    x = sample_batch((3, 3, 8, 8))
    np.testing.assert_array_equal(run_onnx(tmp_path / "model.onnx", x)[0], run_onnx(model, x)[0])
    # the source model is left untouched
    assert all(i.data_location != TensorProto.EXTERNAL for i in model.graph.initializer)


def test_externalize_refuses_initializers_still_on_disk(tmp_path: Path) -> None:
    light = externalize(residual_net(), tmp_path / WEIGHTS_FILE)
    with pytest.raises(BuildError, match="still external"):
        externalize(light, tmp_path / "again.bin")


def test_repository_stays_near_one_model_size(built_tiny: BuiltModel) -> None:
    """Every segment of the tiny model plus the full model and manifest: < 1.5x the source."""
    files = list(built_tiny.model_dir.iterdir())
    assert len(built_tiny.manifest.segments["ort"]) == 66
    total = sum(p.stat().st_size for p in files)
    ratio = total / built_tiny.source.stat().st_size
    assert ratio < 1.5, f"repository is {ratio:.2f}x the source model"


def test_cut_point_shapes_and_bytes() -> None:
    model = residual_net()
    analysis = analyse(model)
    points = cut_points(model, analysis, value_infos(model))
    assert [p.name for p in points] == list(RESIDUAL_CUTS)
    assert [p.index for p in points] == list(range(12))
    assert points[0].shape == (-1, 3, 8, 8) and points[0].bytes_per_sample == 3 * 64 * 4
    assert points[1].shape == (-1, 48, 8, 8) and points[1].bytes_per_sample == 48 * 64 * 4
    assert points[9].shape == (-1, 48, 1, 1) and points[10].shape == (-1, 48)
    assert points[-1].shape == (-1, 10) and points[-1].bytes_per_sample == 40
    assert {p.dtype for p in points} == {"float32"}


def test_dynamic_image_size_is_refused() -> None:
    model = residual_net()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    analysis = analyse(model)
    with pytest.raises(BuildError,
                       match=r"dynamic non-batch dimension.*fixed input height and width"):
        cut_points(model, analysis, value_infos(model))


def test_extract_refuses_ranges_outside_the_model(tmp_path: Path) -> None:
    model = residual_net()
    analysis = analyse(model)
    light = externalize(model, tmp_path / WEIGHTS_FILE)
    infos = value_infos(model)
    for start, end in ((0, 0), (3, 2), (-1, 2), (0, 12)):
        with pytest.raises(BuildError, match=r"outside 0\.\.11"):
            extract(light, analysis, infos, start, end)


# --- which segments ---------------------------------------------------------------------------


def test_segment_ranges_modes() -> None:
    assert segment_ranges(3, "all") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert segment_ranges(3, "blocks") == [(0, 1), (1, 2), (2, 3)]
    assert segment_ranges(4, "window:2") == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 4),
                                             (3, 4)]
    assert segment_ranges(3, "window:1") == segment_ranges(3, "blocks")
    assert segment_ranges(3, "window:99") == segment_ranges(3, "all")


@pytest.mark.parametrize("mode", ["", "none", "All", "window", "window:", "window:0",
                                  "window:-2", "window:two", "window:1.5", "blocks:2"])
def test_segment_ranges_rejects_bad_modes(mode: str) -> None:
    with pytest.raises(BuildError, match="--segments"):
        segment_ranges(5, mode)


@given(blocks=st.integers(1, 40), width=st.integers(1, 45))
def test_segment_ranges_counts(blocks: int, width: int) -> None:
    every = segment_ranges(blocks, "all")
    assert len(every) == blocks * (blocks + 1) // 2 == len(set(every))
    window = segment_ranges(blocks, f"window:{width}")
    assert set(window) <= set(every)
    assert {(i, i + 1) for i in range(blocks)} <= set(window)
    assert all(j - i <= width for i, j in window)
    assert len(window) == sum(min(width, blocks - i) for i in range(blocks))


# --- merging blocks ---------------------------------------------------------------------------


def _chain(blocks: int) -> GraphAnalysis:
    """A stand-in analysis of a chain of ``blocks`` one-node blocks."""
    cuts = tuple(f"t{k}" for k in range(blocks + 1))
    return GraphAnalysis(cuts[0], cuts[-1], cuts, (*range(blocks), -1),
                         frozenset({blocks}), tuple(range(blocks + 1)))


def test_merge_joins_the_cheapest_neighbours() -> None:
    merged = merge_blocks(_chain(5), [1.0, 1.0, 10.0, 1.0, 1.5], 3)
    # (0,1) costs 2 -> merged first; then (3,4) costs 2.5 < (0+1,2) 12 -> merged
    assert merged.cuts == ("t0", "t2", "t3", "t5")
    assert merged.node_block == (0, 0, 1, 2, 2, -1)
    assert merged.const_nodes == frozenset({5})


def test_merge_uses_the_merged_cost() -> None:
    # after (0,1) -> 2, the pair (01, 2) costs 3 and beats (3, 4) = 4
    merged = merge_blocks(_chain(5), [1.0, 1.0, 1.0, 2.0, 2.0], 3)
    assert merged.cuts == ("t0", "t3", "t4", "t5")


def test_merge_ties_go_to_the_first_pair() -> None:
    merged = merge_blocks(_chain(4), [1.0, 1.0, 1.0, 1.0], 3)
    assert merged.cuts == ("t0", "t2", "t3", "t4")


def test_merge_keeps_models_that_are_small_enough() -> None:
    chain = _chain(4)
    assert merge_blocks(chain, [1, 2, 3, 4], 4) == chain
    assert merge_blocks(chain, [1, 2, 3, 4], 10) == chain
    assert merge_blocks(chain, [1, 2, 3, 4], 1).cuts == ("t0", "t4")


def test_merge_refuses_bad_arguments() -> None:
    with pytest.raises(BuildError, match="at least 1"):
        merge_blocks(_chain(4), [1, 2, 3, 4], 0)
    with pytest.raises(BuildError, match="one cost per block"):
        merge_blocks(_chain(4), [1, 2, 3], 2)


@given(costs=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=30),
       max_blocks=st.integers(1, 35))
def test_merge_properties(costs: list[float], max_blocks: int) -> None:
    chain = _chain(len(costs))
    merged = merge_blocks(chain, costs, max_blocks)
    assert merged.blocks == min(len(costs), max_blocks)
    assert merged.cuts[0] == "t0" and merged.cuts[-1] == chain.cuts[-1]
    positions = [chain.cuts.index(c) for c in merged.cuts]
    assert positions == sorted(set(positions))  # a subsequence, in order
    # each old block maps to the new block that spans it
    for old, new in enumerate(merged.node_block[:-1]):
        assert positions[new] <= old < positions[new + 1]


def test_merged_segments_still_equal_the_full_model(tmp_path: Path) -> None:
    model = residual_net()
    analysis = merge_blocks(analyse(model), [float(k % 3) for k in range(11)], 4)
    assert analysis.blocks == 4
    assert _check_every_segment(model, tmp_path, analysis) == 10


def test_segment_filename() -> None:
    assert segment_filename(0, 1) == "seg_0000_0001.onnx"
    assert segment_filename(12, 345) == "seg_0012_0345.onnx"


def test_value_infos_runs_shape_inference_when_the_file_has_none() -> None:
    model = residual_net()
    assert not model.graph.value_info
    infos = value_infos(model)
    assert {"stem", "r1_c1", "cat", "gap", "flat"} <= set(infos)
    with_info = onnx.shape_inference.infer_shapes(model)
    assert set(value_infos(with_info)) == set(infos)


def test_constant_dtype_cut_is_reported() -> None:
    """A cut tensor of another dtype (an int64 index output) is described as such."""
    nodes = [helper.make_node("Relu", ["input"], ["r"]),
             helper.make_node("ArgMax", ["r"], ["output"], axis=1, keepdims=0)]
    model = helper.make_model(helper.make_graph(
        nodes, "argmax", [helper.make_tensor_value_info("input", 1, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("output", TensorProto.INT64, ["N", 4, 4])]),
        opset_imports=[helper.make_opsetid("", 18)])
    points = cut_points(model, analyse(model), value_infos(model))
    assert points[-1].dtype == "int64" and points[-1].bytes_per_sample == 4 * 4 * 8
