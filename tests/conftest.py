"""Shared fixtures: tiny ONNX models generated with ``onnx.helper`` and a tiny built repository.

The models are small enough that a whole build (every segment, verification, profile) takes a
few seconds, yet their weights (float32 initializers well over ``INLINE_LIMIT`` bytes) dominate
their size, as a real model's do, so repository-size checks mean something.

``residual_net``   stem, two residual blocks, a branch + concat, a classifier head; the cut
                   points are known by hand (``RESIDUAL_CUTS``).
``constant_net``   a ``Constant`` feeding a ``Reshape`` and a constant subgraph (initializer
                   times ``Constant``) used two blocks later: constants, not activations.
``dead_branch_net`` the residual net plus nodes that never reach the output.
``two_input_net`` / ``two_output_net``  what a build must refuse.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import settings as hypothesis_settings
from onnx import TensorProto, helper, numpy_helper

from appliance.wire.frames import native
from engines.manifest import Manifest

# `make test` (CI) draws the same hypothesis examples on every run (derandomized: seeded from
# each test), so a property test passes or fails alike everywhere and every time;
# ARMDI_HYPOTHESIS=explore (`make fuzz` sets it) draws new ones each run, to find what the
# fixed ones miss (a CI run found a cycling chain that way: test_controller's _CYCLING).
hypothesis_settings.register_profile("repeatable", derandomize=True)
hypothesis_settings.register_profile("explore", derandomize=False)
hypothesis_settings.load_profile(os.environ.get("ARMDI_HYPOTHESIS", "repeatable"))

needs_c_codec = pytest.mark.skipif(
    native is None,
    reason="the C codec (appliance/wire/_codec.c) was not built at install (no C compiler or "
           "no Python headers): frames decode in Python alone")

OPSET = 18
CHANNELS = 48
SIZE = 8
CLASSES = 10

# The residual net's cut points in order, input first and output last (K = 11 blocks).
RESIDUAL_CUTS = (
    "input", "stem", "a0", "r1_add", "a1", "cat", "a2", "r2_add", "a3", "gap", "flat", "output",
)


def _weight(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    values = rng.standard_normal(shape).astype(np.float32) * np.float32(1.0 / np.sqrt(fan_in))
    return numpy_helper.from_array(values, name)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], initializers: list[onnx.TensorProto],
           name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="armdi-tests")
    model.ir_version = 9
    return model


def image_input(name: str = "input", channels: int = 3, size: int = SIZE) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels, size, size])


def logits_output(name: str = "output", classes: int = CLASSES) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", classes])


def residual_net(seed: int = 0, channels: int = CHANNELS) -> onnx.ModelProto:
    """input -> conv/relu stem -> residual block -> branch + concat -> residual block -> head."""
    rng = np.random.default_rng(seed)
    c, half = channels, channels // 2
    inits = [
        _weight(rng, "stem_w", c, 3, 3, 3), _weight(rng, "stem_b", c),
        _weight(rng, "r1_w1", c, c, 3, 3), _weight(rng, "r1_w2", c, c, 3, 3),
        _weight(rng, "br_w1", half, c, 1, 1), _weight(rng, "br_w2", half, c, 3, 3),
        _weight(rng, "r2_w1", c, c, 3, 3), _weight(rng, "r2_w2", c, c, 3, 3),
        _weight(rng, "fc_w", CLASSES, c), _weight(rng, "fc_b", CLASSES),
    ]
    pad: dict[str, Any] = {"pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["input", "stem_w", "stem_b"], ["stem"], **pad),
        helper.make_node("Relu", ["stem"], ["a0"]),
        # residual block 1
        helper.make_node("Conv", ["a0", "r1_w1"], ["r1_c1"], **pad),
        helper.make_node("Relu", ["r1_c1"], ["r1_r1"]),
        helper.make_node("Conv", ["r1_r1", "r1_w2"], ["r1_c2"], **pad),
        helper.make_node("Add", ["r1_c2", "a0"], ["r1_add"]),
        helper.make_node("Relu", ["r1_add"], ["a1"]),
        # two branches joined by a concat
        helper.make_node("Conv", ["a1", "br_w1"], ["br1"]),
        helper.make_node("Conv", ["a1", "br_w2"], ["br2"], **pad),
        helper.make_node("Concat", ["br1", "br2"], ["cat"], axis=1),
        helper.make_node("Relu", ["cat"], ["a2"]),
        # residual block 2
        helper.make_node("Conv", ["a2", "r2_w1"], ["r2_c1"], **pad),
        helper.make_node("Relu", ["r2_c1"], ["r2_r1"]),
        helper.make_node("Conv", ["r2_r1", "r2_w2"], ["r2_c2"], **pad),
        helper.make_node("Add", ["a2", "r2_c2"], ["r2_add"]),
        helper.make_node("Relu", ["r2_add"], ["a3"]),
        # head
        helper.make_node("GlobalAveragePool", ["a3"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["output"], transB=1),
    ]
    return _model(nodes, [image_input()], [logits_output()], inits, "residual_net")


def dead_branch_net(seed: int = 0) -> onnx.ModelProto:
    """The residual net plus a dead branch: nodes whose results never reach the output. One
    joins ``a0`` with ``a2``, which would hide the cuts between them if it were counted."""
    model = residual_net(seed)
    model.graph.node.extend([
        helper.make_node("Mul", ["a0", "a2"], ["dead_mul"]),
        helper.make_node("Sigmoid", ["dead_mul"], ["dead_sig"]),
        helper.make_node("Relu", ["r1_c1"], ["dead_inner"]),
    ])
    return model


# Cut points of constant_net (K = 6 blocks).
CONSTANT_CUTS = ("input", "conv", "relu", "flat", "scaled", "fc", "output")


def constant_net(seed: int = 0) -> onnx.ModelProto:
    """A net whose Reshape target and scale are constants computed without a Shape op."""
    rng = np.random.default_rng(seed)
    c, size = 8, 4
    features = c * size * size
    inits = [
        _weight(rng, "conv_w", c, 3, 3, 3),
        _weight(rng, "base_scale", features),  # 512 bytes: external
        _weight(rng, "fc_w", CLASSES, features),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        # a Constant as the Reshape's target shape (ONNX shape inference folds no deeper)
        helper.make_node("Constant", [], ["shape_const"],
                         value=numpy_helper.from_array(np.array([-1, features], np.int64), "k")),
        helper.make_node("Reshape", ["relu", "shape_const"], ["flat"]),
        # constant subgraph 2: initializer * Constant, used two blocks later
        helper.make_node("Constant", [], ["two"], value_float=2.0),
        helper.make_node("Mul", ["base_scale", "two"], ["scale"]),
        helper.make_node("Mul", ["flat", "scale"], ["scaled"]),
        helper.make_node("Transpose", ["fc_w"], ["fc_w_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["scaled", "fc_w_t"], ["fc"]),
        helper.make_node("Mul", ["fc", "two"], ["output"]),
    ]
    return _model(nodes, [image_input(size=size)], [logits_output()], inits, "constant_net")


def two_input_net() -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["x", "y"], ["sum"]),
             helper.make_node("Relu", ["sum"], ["output"])]
    return _model(nodes, [image_input("x"), image_input("y")],
                  [helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                                 ["N", 3, SIZE, SIZE])], [], "two_inputs")


def two_output_net() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["input"], ["out_a"]),
             helper.make_node("Sigmoid", ["input"], ["out_b"])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, SIZE, SIZE])
            for n in ("out_a", "out_b")]
    return _model(nodes, [image_input()], outs, [], "two_outputs")


def with_export_metadata(model: onnx.ModelProto, checkout: str,
                         producer_version: str = "2.14.0") -> onnx.ModelProto:
    """``model`` as an exporter run from ``checkout`` would write it: stack traces and doc
    strings naming that checkout's files, and its own producer version."""
    model.producer_name, model.producer_version = "pytorch", producer_version
    model.doc_string = f"exported by {checkout}/builder/sources.py"
    entry = model.metadata_props.add()
    entry.key, entry.value = "pkg.torch.onnx.source", f"{checkout}/builder/efficientnet_lite.py"
    model.graph.doc_string = checkout
    for index, node in enumerate(model.graph.node):
        node.doc_string = f'File "{checkout}/builder/efficientnet_lite.py", line {index}'
        meta = node.metadata_props.add()
        meta.key, meta.value = "pkg.torch.onnx.stack_trace", f"{checkout}/x.py:{index}"
    return model


def reorder_nodes(model: onnx.ModelProto, order: list[int]) -> onnx.ModelProto:
    """A copy of ``model`` whose node list is stored in ``order``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [onnx.NodeProto() for _ in order]
    for new, old in zip(nodes, order, strict=True):
        new.CopyFrom(model.graph.node[old])
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def random_topological_order(model: onnx.ModelProto, seed: int) -> list[int]:
    """A random valid topological order of ``model``'s nodes (Kahn's with random picks)."""
    rng = random.Random(seed)
    nodes = list(model.graph.node)
    producer = {t: i for i, n in enumerate(nodes) for t in n.output}
    deps = [{producer[t] for t in n.input if t in producer} for n in nodes]
    done: set[int] = set()
    order: list[int] = []
    while len(order) < len(nodes):
        ready = [i for i in range(len(nodes)) if i not in done and deps[i] <= done]
        pick = rng.choice(ready)
        done.add(pick)
        order.append(pick)
    return order


def run_onnx(model: onnx.ModelProto | Path, x: np.ndarray,
             outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run a model (or a file) with ONNX Runtime on CPU; ``outputs`` may name inner tensors."""
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto) and outputs:
        model = _with_outputs(model, outputs)
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    return [np.asarray(a) for a in session.run(outputs, feed)]


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {vi.name: vi for vi in (*inferred.graph.value_info, *inferred.graph.input,
                                    *inferred.graph.output)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(known[n] for n in names)
    return out


def sample_batch(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@dataclass(frozen=True)
class BuiltModel:
    """A model built into a repository: where, its manifest, and the source file."""

    repo: Path
    manifest: Manifest
    source: Path

    @property
    def model_dir(self) -> Path:
        return self.repo / self.manifest.model_id


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Path:
    """The residual net saved as ``tiny.onnx`` (model id ``tiny``)."""
    return save(residual_net(), tmp_path / "src" / "tiny.onnx")


@pytest.fixture
def constant_onnx(tmp_path: Path) -> Path:
    return save(constant_net(), tmp_path / "src" / "consts.onnx")


@pytest.fixture
def two_input_onnx(tmp_path: Path) -> Path:
    return save(two_input_net(), tmp_path / "src" / "two_inputs.onnx")


def build_tiny(source: Path, repo: Path, **options: object) -> tuple[Path, Manifest]:
    """Build ``source`` into ``repo`` quickly (ONNX Runtime only, few profile repeats) and
    return both."""
    from builder.build import BuildOptions, build

    settings: dict[str, object] = {"profile_repeats": 3, "profile_segments": 6,
                                   "backend": "ort", **options}
    report = build(BuildOptions(model=str(source), repo=repo, **settings))  # type: ignore[arg-type]
    return repo, report.manifest


@pytest.fixture(scope="session")
def built_tiny_session(tmp_path_factory: pytest.TempPathFactory) -> BuiltModel:
    """The residual net built once per session with every segment (read-only: copy it)."""
    root = tmp_path_factory.mktemp("built_tiny")
    source = save(residual_net(), root / "src" / "tiny.onnx")
    repo, manifest = build_tiny(source, root / "repo")
    return BuiltModel(repo, manifest, source)


@pytest.fixture
def built_tiny(built_tiny_session: BuiltModel, tmp_path: Path) -> Iterator[BuiltModel]:
    """A private copy of the session's tiny repository, free to tamper with."""
    repo = tmp_path / "repo"
    shutil.copytree(built_tiny_session.repo, repo)
    yield BuiltModel(repo, built_tiny_session.manifest, built_tiny_session.source)


def other_version(built: BuiltModel, tmp: Path) -> Path:
    """A copy of ``built``'s repository (in ``tmp/other-repo``) whose model is another
    version of it (other preprocessing), with the fingerprint that content gives."""
    import json

    repo = tmp / "other-repo"
    shutil.copytree(built.repo, repo)
    path = repo / built.manifest.model_id / "manifest.json"
    manifest = Manifest.model_validate_json(path.read_text())
    manifest = manifest.model_copy(update={"preprocessing": manifest.preprocessing.model_copy(
        update={"resize": 300})})
    data = manifest.model_dump(mode="json")
    data["fingerprint"] = manifest.content_fingerprint()
    path.write_text(json.dumps(data))
    return repo


@pytest.fixture
def tiny_repo(built_tiny: BuiltModel) -> tuple[Path, Manifest]:
    """``(repo, manifest)`` of a private copy of the built tiny model (id ``tiny``)."""
    return built_tiny.repo, built_tiny.manifest
