"""Cut points: the dominators of the output, found whatever order the nodes are stored in,
with constant subgraphs and dead branches set aside."""

from __future__ import annotations

import onnx
import pytest
from onnx import helper

from builder.graph import analyse, graph_io
from engines.errors import BuildError
from tests.conftest import (
    CONSTANT_CUTS,
    RESIDUAL_CUTS,
    constant_net,
    dead_branch_net,
    random_topological_order,
    reorder_nodes,
    residual_net,
    two_input_net,
    two_output_net,
)


def _block_of(model: onnx.ModelProto, analysis_blocks: tuple[int, ...]) -> dict[str, int]:
    """Block number per node, keyed by the node's first output (stable under reordering)."""
    return {node.output[0]: block for node, block in zip(model.graph.node, analysis_blocks,
                                                         strict=True)}


def _sweep_cuts(model: onnx.ModelProto) -> list[str]:
    """The naive method: walk the stored node order and report each point where exactly one
    produced tensor is still waiting for a consumer. Used to show which orders fool it."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    nodes = list(graph.node)
    last_use: dict[str, int] = {}
    for idx, node in enumerate(nodes):
        for t in node.input:
            last_use[t] = idx
    output = graph.output[0].name
    last_use[output] = len(nodes)
    source = graph_io(model)[0]
    cuts = [source]
    for idx, node in enumerate(nodes):
        produced = {source} | {t for n in nodes[: idx + 1] for t in n.output}
        live = {t for t in produced - initializers if last_use.get(t, -1) > idx}
        if len(live) == 1 and node.output[0] in live:
            cuts.append(node.output[0])
    return cuts


def test_residual_net_cuts_only_between_residual_blocks() -> None:
    model = residual_net()
    analysis = analyse(model)
    assert analysis.cuts == RESIDUAL_CUTS
    assert analysis.blocks == len(RESIDUAL_CUTS) - 1 == 11
    assert (analysis.input_name, analysis.output_name) == ("input", "output")
    blocks = _block_of(model, analysis.node_block)
    # a residual block's inner convolutions and its Add belong to one block
    assert blocks["r1_c1"] == blocks["r1_r1"] == blocks["r1_c2"] == blocks["r1_add"] == 2
    assert blocks["br1"] == blocks["br2"] == blocks["cat"] == 4
    assert blocks["r2_c1"] == blocks["r2_add"] == 6
    assert blocks["stem"] == 0 and blocks["output"] == 10
    # every node is in the block that ends at its cut (or inside it)
    for k, cut in enumerate(RESIDUAL_CUTS[1:]):
        assert blocks[cut] == k
    assert analysis.const_nodes == frozenset()
    assert sorted(analysis.topo_order) == list(range(len(model.graph.node)))


@pytest.mark.parametrize("seed", range(6))
def test_cuts_do_not_depend_on_a_valid_stored_order(seed: int) -> None:
    model = dead_branch_net()
    order = random_topological_order(model, seed)
    shuffled = reorder_nodes(model, order)
    onnx.checker.check_model(shuffled)  # still a valid, topologically sorted file
    analysis = analyse(shuffled)
    assert analysis.cuts == RESIDUAL_CUTS
    assert _block_of(shuffled, analysis.node_block) == _block_of(
        model, analyse(model).node_block)


def test_cuts_do_not_depend_on_an_invalid_stored_order() -> None:
    """A file whose nodes are stored backwards (not topological) gives the same cuts, and a
    valid topological order to extract segments in."""
    model = residual_net()
    backwards = reorder_nodes(model, list(range(len(model.graph.node)))[::-1])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(backwards)
    analysis = analyse(backwards)
    assert analysis.cuts == RESIDUAL_CUTS
    assert _block_of(backwards, analysis.node_block) == _block_of(
        model, analyse(model).node_block)
    seen: set[str] = {"input"} | {i.name for i in backwards.graph.initializer}
    for idx in analysis.topo_order:
        node = backwards.graph.node[idx]
        assert all(t in seen for t in node.input), node.name
        seen.update(node.output)


def test_a_sweep_over_the_stored_order_is_fooled_where_dominators_are_not() -> None:
    """A dead node keeps ``a0`` waiting, and a constant used by the first and the last block
    looks 'live' in between: a sweep loses cuts that the dominator analysis keeps."""
    model = residual_net()
    assert _sweep_cuts(model) == list(RESIDUAL_CUTS)  # the friendly order: both agree
    dead = dead_branch_net()
    assert len(_sweep_cuts(dead)) < len(RESIDUAL_CUTS)
    assert analyse(dead).cuts == RESIDUAL_CUTS
    consts = constant_net()
    swept = _sweep_cuts(consts)
    assert "scaled" not in swept and "fc" not in swept  # the constant "two" looks live
    assert analyse(consts).cuts == CONSTANT_CUTS


def test_constant_subgraph_is_not_an_activation() -> None:
    model = constant_net()
    analysis = analyse(model)
    assert analysis.cuts == CONSTANT_CUTS
    names = [n.output[0] for n in model.graph.node]
    const = {names[i] for i in analysis.const_nodes}
    assert const == {"shape_const", "two", "scale", "fc_w_t"}
    for i in analysis.const_nodes:
        assert analysis.node_block[i] == -1
    blocks = _block_of(model, analysis.node_block)
    assert blocks["flat"] == 2 and blocks["scaled"] == 3 and blocks["fc"] == 4
    assert blocks["output"] == 5


def test_dead_branch_is_ignored() -> None:
    model = dead_branch_net()
    analysis = analyse(model)
    assert analysis.cuts == RESIDUAL_CUTS
    blocks = _block_of(model, analysis.node_block)
    assert blocks["dead_mul"] == blocks["dead_sig"] == blocks["dead_inner"] == -1
    # dead nodes depend on the input: they are not constants either
    assert not analysis.const_nodes


def test_single_chain_cuts_after_every_node() -> None:
    nodes = [helper.make_node("Relu", ["input"], ["r"]),
             helper.make_node("Sigmoid", ["r"], ["s"]),
             helper.make_node("Neg", ["s"], ["output"])]
    model = helper.make_model(helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("input", 1, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("output", 1, ["N", 3, 4, 4])]))
    assert analyse(model).cuts == ("input", "r", "s", "output")


def test_two_inputs_are_refused_with_a_clear_message() -> None:
    with pytest.raises(BuildError, match=r"exactly one input tensor, found 2: \['x', 'y'\]"):
        analyse(two_input_net())


def test_two_outputs_are_refused_with_a_clear_message() -> None:
    with pytest.raises(BuildError,
                       match=r"exactly one output tensor, found 2: \['out_a', 'out_b'\]"):
        analyse(two_output_net())


def test_initializers_listed_as_graph_inputs_are_not_inputs() -> None:
    """Old exporters list every initializer among the graph inputs too."""
    model = residual_net()
    model.graph.input.extend(
        helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
        for i in model.graph.initializer)
    assert graph_io(model) == ("input", "output")
    assert analyse(model).cuts == RESIDUAL_CUTS


def test_output_that_ignores_the_input_is_refused() -> None:
    model = constant_net()
    model.graph.output[0].name = "scale"
    with pytest.raises(BuildError, match="does not depend on its input"):
        analyse(model)


def test_cycle_is_refused() -> None:
    nodes = [helper.make_node("Add", ["input", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["output"])]
    model = helper.make_model(helper.make_graph(
        nodes, "cycle", [helper.make_tensor_value_info("input", 1, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("output", 1, ["N", 3, 4, 4])]))
    with pytest.raises(BuildError, match="cycle"):
        analyse(model)
