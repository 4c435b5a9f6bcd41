"""Cut points on any ONNX graph.

A *cut point* is a tensor through which every path from the model input to the model output
passes. Exactly those tensors split the graph into a prefix and a rest with the tensor as the
only live activation between them (see the proof sketch in ``docs/builder.md``). They are
the dominators of the output in the tensor graph, found here whatever order the file stores its
nodes in. Nodes that do not depend on the input (constant subgraphs) are not activations: a
segment that needs one simply carries a copy of it.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

import onnx

from engines.errors import BuildError


@dataclass(frozen=True)
class GraphAnalysis:
    """The result of ``analyse``: cut tensors in order and each live node's block."""

    input_name: str
    output_name: str
    cuts: tuple[str, ...]  # cuts[0] is the input, cuts[-1] the output; K = len(cuts) - 1
    node_block: tuple[int, ...]  # per node index of graph.node: block number, or -1
    const_nodes: frozenset[int]  # node indices that do not depend on the input
    topo_order: tuple[int, ...]  # node indices in a valid topological order

    @property
    def blocks(self) -> int:
        return len(self.cuts) - 1


def graph_io(model: onnx.ModelProto) -> tuple[str, str]:
    """The single image input and single output of ``model``, or ``BuildError``."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise BuildError(
            f"the model must have exactly one input tensor, found {len(inputs)}: {inputs}"
        )
    outputs = [o.name for o in model.graph.output]
    if len(outputs) != 1:
        raise BuildError(
            f"the model must have exactly one output tensor, found {len(outputs)}: {outputs}"
        )
    return inputs[0], outputs[0]


def _topological_order(nodes: list[onnx.NodeProto], available: set[str]) -> list[int]:
    """Kahn's algorithm over node indices; ``available`` are tensors known up front."""
    producer: dict[str, int] = {}
    for idx, node in enumerate(nodes):
        for out in node.output:
            if out:
                producer[out] = idx
    waiting = [0] * len(nodes)
    consumers: dict[int, list[int]] = defaultdict(list)
    for idx, node in enumerate(nodes):
        deps = {producer[t] for t in node.input if t and t not in available and t in producer}
        waiting[idx] = len(deps)
        for dep in deps:
            consumers[dep].append(idx)
    ready = deque(i for i, w in enumerate(waiting) if w == 0)
    order: list[int] = []
    while ready:
        idx = ready.popleft()
        order.append(idx)
        for nxt in consumers[idx]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(nxt)
    if len(order) != len(nodes):
        raise BuildError("the ONNX graph has a cycle or a node whose input is never produced")
    return order


def analyse(model: onnx.ModelProto) -> GraphAnalysis:
    """Find every cut point of ``model`` and assign each input-dependent node to its block."""
    graph = model.graph
    nodes = list(graph.node)
    input_name, output_name = graph_io(model)
    constants = {init.name for init in graph.initializer}
    order = _topological_order(nodes, constants | {input_name})

    # Which nodes depend on the input (forward) and feed the output (backward)?
    depends: set[str] = {input_name}
    dynamic_nodes: set[int] = set()
    for idx in order:
        if any(t in depends for t in nodes[idx].input):
            dynamic_nodes.add(idx)
            depends.update(t for t in nodes[idx].output if t)
    if output_name not in depends:
        raise BuildError("the model output does not depend on its input")
    needed: set[str] = {output_name}
    live: set[int] = set()
    for idx in reversed(order):
        if idx in dynamic_nodes and any(t in needed for t in nodes[idx].output):
            live.add(idx)
            needed.update(t for t in nodes[idx].input if t in depends)

    # Dominators of the tensor graph (a DAG): process tensors in topological order and set
    # each one's immediate dominator to the common dominator of its predecessors.
    idom: dict[str, str] = {input_name: input_name}
    depth: dict[str, int] = {input_name: 0}

    def common(a: str, b: str) -> str:
        while a != b:
            if depth[a] >= depth[b]:
                a = idom[a]
            else:
                b = idom[b]
        return a

    for idx in order:
        if idx not in live:
            continue
        preds = [t for t in nodes[idx].input if t in depends and t in idom]
        dom = preds[0]
        for pred in preds[1:]:
            dom = common(dom, pred)
        for out in nodes[idx].output:
            if out in needed:
                idom[out] = dom
                depth[out] = depth[dom] + 1
    chain = [output_name]
    while chain[-1] != input_name:
        chain.append(idom[chain[-1]])
    cuts = tuple(reversed(chain))
    cut_index = {name: k for k, name in enumerate(cuts)}

    # Blocks: a node belongs to the block of its latest input cut.
    level: dict[str, int] = {input_name: 0}
    node_block = [-1] * len(nodes)
    for idx in order:
        if idx not in live:
            continue
        block = max(level[t] for t in nodes[idx].input if t in level)
        node_block[idx] = block
        for out in nodes[idx].output:
            if out:
                level[out] = cut_index.get(out, block)
    const_nodes = frozenset(i for i in range(len(nodes)) if i not in dynamic_nodes)
    return GraphAnalysis(
        input_name=input_name,
        output_name=output_name,
        cuts=cuts,
        node_block=tuple(node_block),
        const_nodes=const_nodes,
        topo_order=tuple(order),
    )



def drop_cuts(analysis: GraphAnalysis, drop: set[int]) -> GraphAnalysis:
    """The same graph with the cut points at indices ``drop`` removed: each dropped cut joins
    the two blocks on either side of it. The input (0) and output (K) cannot be dropped."""
    if not drop:
        return analysis
    if 0 in drop or analysis.blocks in drop:
        raise BuildError("the model input and output are always cut points")
    kept = [k for k in range(len(analysis.cuts)) if k not in drop]
    # Old block b (between old cuts b and b+1) lies in the new block of the last kept cut <= b.
    new_block, current = [], -1
    for block in range(analysis.blocks):
        if block not in drop:
            current += 1
        new_block.append(current)
    node_block = tuple(new_block[b] if b >= 0 else -1 for b in analysis.node_block)
    return GraphAnalysis(analysis.input_name, analysis.output_name,
                         tuple(analysis.cuts[k] for k in kept), node_block,
                         analysis.const_nodes, analysis.topo_order)


def sort_nodes(model: onnx.ModelProto) -> bool:
    """Store ``model``'s nodes in a topological order (in place); True if they moved.

    ``onnx.checker``, shape inference and some runtimes need the stored order to be
    topological, which the ONNX format does not enforce on writers."""
    graph = model.graph
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    order = _topological_order(list(graph.node), available)
    if order == sorted(order):
        return False
    nodes = [onnx.NodeProto() for _ in order]
    for new, old in zip(nodes, order, strict=True):
        new.CopyFrom(graph.node[old])
    del graph.node[:]
    graph.node.extend(nodes)
    return True
