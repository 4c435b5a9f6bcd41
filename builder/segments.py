"""Blocks and segments as ONNX files that share one weights file.

Every initializer larger than ``INLINE_LIMIT`` bytes is written once to ``weights.bin``; the
full model and every segment file refer to it through ONNX external data (location, offset,
length), so a repository holding hundreds of segments stays close to one copy of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
from onnx import TensorProto, helper

from builder.graph import GraphAnalysis, _topological_order
from engines.errors import BuildError
from engines.manifest import CutPoint

WEIGHTS_FILE = "weights.bin"
INLINE_LIMIT = 128
_ALIGN = 64


def externalize(model: onnx.ModelProto, weights_path: Path) -> onnx.ModelProto:
    """Write large initializers of ``model`` to ``weights_path`` and return a copy of the model
    that refers to them. The copy holds no weight bytes and is cheap to slice; it is built
    without ever copying the weights (a protobuf copy of vgg16 held another 553 MB, and the
    cleared fields kept their bytes in the message's arena)."""
    out = _copy_without(model, "graph")
    out.graph.CopyFrom(_copy_without(model.graph, "initializer"))
    offset = 0
    with weights_path.open("wb") as fh:
        for init in model.graph.initializer:
            if init.data_location == TensorProto.EXTERNAL:
                raise BuildError(f"initializer {init.name!r} is still external; load it first")
            raw = init.raw_data if init.HasField("raw_data") else None
            if raw is None:
                raw = onnx.numpy_helper.to_array(init).tobytes()
            entry = out.graph.initializer.add()
            if len(raw) <= INLINE_LIMIT:
                entry.CopyFrom(init)
                continue
            pad = (-offset) % _ALIGN
            fh.write(b"\0" * pad)
            offset += pad
            fh.write(raw)
            entry.name, entry.data_type = init.name, init.data_type
            entry.dims.extend(init.dims)
            entry.data_location = TensorProto.EXTERNAL
            for key, value in (("location", weights_path.name), ("offset", str(offset)),
                               ("length", str(len(raw)))):
                item = entry.external_data.add()
                item.key, item.value = key, value
            offset += len(raw)
            del raw
    strip_metadata(out)
    _shorten_initializer_names(out.graph)
    for node in out.graph.node:
        _drop_default_attributes(node)
    return out


def strip_metadata(model: onnx.ModelProto) -> None:
    """Remove what says how and where the model was exported rather than what it computes:
    exporter annotations (stack traces with source paths, fx names), doc strings and the
    producer's version. They would be copied into every segment, and they would make the
    content fingerprint depend on the machine that exported the model."""
    model.producer_name, model.producer_version, model.doc_string = "armdi", "", ""
    del model.metadata_props[:]
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        graph.doc_string = ""
        del graph.metadata_props[:]
        for item in (*graph.node, *graph.initializer, *graph.value_info, *graph.input,
                     *graph.output):
            del item.metadata_props[:]
            item.doc_string = ""
        for node in graph.node:
            for attr in node.attribute:
                attr.doc_string = ""
                graphs.extend([attr.g] if attr.HasField("g") else [])
                graphs.extend(attr.graphs)
    for function in model.functions:
        function.doc_string = ""
        del function.metadata_props[:]
        for node in function.node:
            del node.metadata_props[:]
            node.doc_string = ""


_Proto = TypeVar("_Proto", onnx.ModelProto, onnx.GraphProto)


def _copy_without(message: _Proto, skip: str) -> _Proto:
    """A copy of a protobuf message without the field ``skip`` (never copied, not even once)."""
    copy = type(message)()
    for descriptor, value in message.ListFields():
        if descriptor.name == skip:
            continue
        target = getattr(copy, descriptor.name)
        repeated = (descriptor.is_repeated if hasattr(descriptor, "is_repeated")
                    else descriptor.label == descriptor.LABEL_REPEATED)
        if repeated:
            target.extend(value)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(copy, descriptor.name, value)
    return copy


def weights_bytes(model: onnx.ModelProto) -> int:
    """The bytes of all initializers of ``model``, external or inline."""
    total = 0
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            total += int(next((e.value for e in init.external_data if e.key == "length"), 0))
        else:
            total += init.ByteSize()
    return total


def _shorten_initializer_names(graph: onnx.GraphProto) -> None:
    """Rename initializers to ``w0, w1, ...``: their names are repeated in every segment file
    and were a third of the repository's size. Skipped for graphs with subgraphs, whose
    bodies may refer to outer names."""
    has_subgraphs = any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for node in graph.node for attr in node.attribute)
    if has_subgraphs:
        return
    taken = {t for node in graph.node for t in (*node.input, *node.output)}
    taken |= {vi.name for vi in (*graph.input, *graph.output)}
    rename = {}
    for index, init in enumerate(graph.initializer):
        new = f"w{index}"
        while new in taken:
            new = "_" + new
        rename[init.name] = new
        init.name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def _drop_default_attributes(node: onnx.NodeProto) -> None:
    """Drop Conv/pool attributes that only restate the ONNX default (they repeat per segment)."""
    if node.op_type not in ("Conv", "MaxPool", "AveragePool") or node.domain not in ("", "ai.onnx"):
        return
    keep = []
    for attr in node.attribute:
        default = (
            (attr.name == "auto_pad" and attr.s == b"NOTSET")
            or (attr.name == "group" and attr.i == 1)
            or (attr.name in ("dilations", "strides") and all(v == 1 for v in attr.ints))
            or (attr.name == "pads" and all(v == 0 for v in attr.ints))
        )
        if not default:
            keep.append(attr)
    if len(keep) != len(node.attribute):
        del node.attribute[:]
        node.attribute.extend(keep)


def value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every tensor's type as shape inference sees it (runs inference when the file has none)."""
    graph = model.graph
    known = {vi.name: vi for vi in (*graph.input, *graph.output, *graph.value_info)}
    produced = {t for node in graph.node for t in node.output if t}
    if not produced <= known.keys():
        # Shape inference walks the stored node order: give it a topological one.
        ordered = onnx.ModelProto()
        ordered.CopyFrom(model)
        available = {i.name for i in graph.input} | {i.name for i in graph.initializer}
        del ordered.graph.node[:]
        ordered.graph.node.extend(graph.node[i]
                                  for i in _topological_order(list(graph.node), available))
        inferred = onnx.shape_inference.infer_shapes(ordered, data_prop=True)
        known.update({vi.name: vi for vi in inferred.graph.value_info if vi.name not in known})
    # Copies: a reference to a sub-message would keep the whole model (weights and all) alive.
    copies = {}
    for name, vi in known.items():
        copies[name] = onnx.ValueInfoProto()
        copies[name].CopyFrom(vi)
    return copies


def tensor_shape(vi: onnx.ValueInfoProto) -> tuple[int, ...]:
    dims = vi.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)


def cut_points(model: onnx.ModelProto, analysis: GraphAnalysis,
               infos: dict[str, onnx.ValueInfoProto]) -> tuple[CutPoint, ...]:
    points = []
    for index, name in enumerate(analysis.cuts):
        vi = infos.get(name)
        if vi is None or not vi.type.tensor_type.shape.dim:
            raise BuildError(f"shape inference gave no shape for cut tensor {name!r}")
        shape = tensor_shape(vi)
        if any(d < 0 for d in shape[1:]):
            raise BuildError(
                f"cut tensor {name!r} has a dynamic non-batch dimension {shape}; "
                "export the model with fixed input height and width"
            )
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        per_sample = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        points.append(CutPoint(index=index, name=name, shape=shape, dtype=dtype.name,
                               bytes_per_sample=per_sample))
    return tuple(points)


def resolve_cut_shapes(model_path: Path, analysis: GraphAnalysis,
                       infos: dict[str, onnx.ValueInfoProto]) -> list[str]:
    """Give every cut tensor a full shape in ``infos``; return the names that needed a run.

    Shape inference cannot fold every constant chain (``Constant -> Identity -> Reshape``
    leaves the shape unknown). Such shapes are read from one ONNX Runtime run of the full
    model (``model_path``, weights beside it) with the unresolved cuts as extra outputs. With
    a dynamic batch the run uses batch 2, and a leading 2 is recorded as the batch axis."""
    first = infos.get(analysis.cuts[0])
    dynamic_batch = first is None or (tensor_shape(first) or (0,))[0] < 0
    missing = [name for name in analysis.cuts
               if _needs_shape(infos.get(name), dynamic_batch)]
    if not missing:
        return []
    import onnxruntime as ort

    model = onnx.load(str(model_path), load_external_data=False)
    known = {o.name for o in model.graph.output}
    for name in missing:
        if name not in known:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    probe = model_path.with_name(f".shapes-{model_path.name}")
    onnx.save(model, str(probe))
    try:
        session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        dynamic_batch = not isinstance(inp.shape[0], int)
        shape = [2 if dynamic_batch else inp.shape[0],
                 *(d if isinstance(d, int) else -1 for d in inp.shape[1:])]
        if any(d < 0 for d in shape):
            raise BuildError(f"the model input has a dynamic non-batch dimension {inp.shape}; "
                             "export the model with fixed input height and width")
        vi = infos[analysis.cuts[0]]
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        try:
            values = session.run(missing, {inp.name: x})
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise BuildError(f"could not run the model to read its cut shapes: {exc}") from exc
    finally:
        probe.unlink(missing_ok=True)
    for name, value in zip(missing, values, strict=True):
        array = np.asarray(value)
        dims: list[int | str] = list(array.shape)
        if dynamic_batch and dims and dims[0] == 2:
            dims[0] = "N"
        elem = helper.np_dtype_to_tensor_dtype(array.dtype)
        infos[name] = helper.make_tensor_value_info(name, elem, dims)
    return missing


def _needs_shape(vi: onnx.ValueInfoProto | None, dynamic_batch: bool) -> bool:
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return True
    shape = tensor_shape(vi)
    return any(d < 0 for d in (shape[1:] if dynamic_batch else shape))


def batchless_cuts(analysis: GraphAnalysis,
                   infos: dict[str, onnx.ValueInfoProto]) -> set[int]:
    """Indices of inner cut tensors whose leading axis is not the model's batch axis.

    Every activation is a batch of samples along its first axis: engines take a batch,
    verification and the runtime split and join along it. A tensor that the exporter
    flattened away from the batch (ConvNeXt's and Swin's global pooling: ``ReduceMean`` then
    ``Reshape`` to ``(768,)`` then ``Gather`` back to ``(1, 768, 1, 1)``) may still be the only
    live tensor between two parts of the graph, but it cannot be an activation on the wire:
    the blocks on either side of it are joined instead."""
    batch = tensor_shape(infos[analysis.cuts[0]])[0]
    drop = set()
    for index in range(1, analysis.blocks):
        shape = tensor_shape(infos[analysis.cuts[index]])
        if not shape or shape[0] != batch:
            drop.add(index)
    return drop


def extract(model: onnx.ModelProto, analysis: GraphAnalysis,
            infos: dict[str, onnx.ValueInfoProto], start: int, end: int) -> onnx.ModelProto:
    """The segment ``[start, end)`` of an externalized model as its own ONNX model."""
    if not 0 <= start < end <= analysis.blocks:
        raise BuildError(f"segment [{start}, {end}) is outside 0..{analysis.blocks}")
    graph = model.graph
    nodes = [graph.node[i] for i in analysis.topo_order
             if start <= analysis.node_block[i] < end]
    # Constant subgraphs: pull in every input-independent node these nodes need, transitively.
    producer = {out: i for i in analysis.const_nodes for out in graph.node[i].output}
    wanted: set[int] = set()
    stack = [t for n in nodes for t in n.input]
    while stack:
        tensor = stack.pop()
        idx = producer.get(tensor)
        if idx is not None and idx not in wanted:
            wanted.add(idx)
            stack.extend(graph.node[idx].input)
    const_nodes = [graph.node[i] for i in analysis.topo_order if i in wanted]
    all_nodes = const_nodes + nodes
    used = {t for n in all_nodes for t in n.input}
    initializers = [init for init in graph.initializer if init.name in used]
    seg_graph = helper.make_graph(
        all_nodes,
        f"{graph.name or 'model'}_{start}_{end}",
        [infos[analysis.cuts[start]]],
        [infos[analysis.cuts[end]]],
        initializer=initializers,
    )
    seg = helper.make_model(seg_graph, opset_imports=list(model.opset_import),
                            producer_name="armdi")
    seg.ir_version = model.ir_version
    seg.functions.extend(model.functions)
    return seg


def segment_filename(start: int, end: int) -> str:
    return f"seg_{start:04d}_{end:04d}.onnx"


def segment_ranges(blocks: int, mode: str) -> list[tuple[int, int]]:
    """Which segments to build: ``all``, ``blocks`` (single blocks only) or ``window:W``
    (every segment of at most W blocks; the block engines are always built)."""
    if mode == "all":
        return [(i, j) for i in range(blocks) for j in range(i + 1, blocks + 1)]
    if mode == "blocks":
        return [(i, i + 1) for i in range(blocks)]
    if mode.startswith("window:"):
        try:
            width = int(mode.split(":", 1)[1])
        except ValueError:
            width = 0
        if width < 1:
            raise BuildError(f"--segments {mode!r}: W must be a positive integer")
        return [(i, j) for i in range(blocks) for j in range(i + 1, min(i + width, blocks) + 1)]
    raise BuildError(f"--segments {mode!r}: use all, blocks or window:W")


def merge_blocks(analysis: GraphAnalysis, costs: list[float], max_blocks: int) -> GraphAnalysis:
    """Drop cut points, cheapest neighbouring pair first, until at most ``max_blocks`` remain."""
    if max_blocks < 1:
        raise BuildError("--max-blocks must be at least 1")
    if len(costs) != analysis.blocks:
        raise BuildError("one cost per block is needed to merge blocks")
    groups = [[k] for k in range(analysis.blocks)]
    cost = list(costs)
    while len(groups) > max_blocks:
        pair = min(range(len(groups) - 1), key=lambda g: (cost[g] + cost[g + 1], g))
        groups[pair : pair + 2] = [groups[pair] + groups[pair + 1]]
        cost[pair : pair + 2] = [cost[pair] + cost[pair + 1]]
    new_block = {old: new for new, group in enumerate(groups) for old in group}
    cuts = (analysis.cuts[0], *(analysis.cuts[group[-1] + 1] for group in groups))
    node_block = tuple(new_block[b] if b >= 0 else -1 for b in analysis.node_block)
    return GraphAnalysis(analysis.input_name, analysis.output_name, cuts, node_block,
                         analysis.const_nodes, analysis.topo_order)
