"""Build TensorRT engines for segment ONNX files, one device at a time.

What happens for one segment ``[start, end)``:

1. ``check_ops`` reads the ONNX file (weights left on disk) and names the ops and opset this
   TensorRT version cannot import, before minutes go into a build.
2. ``engine_key`` hashes everything the engine depends on (model fingerprint, segment,
   TensorRT version, GPU and compute capability, precision, batch profile, DLA core);
   the engine file is ``<engine_dir>/<key>.engine``.
3. ``load_or_build``: an existing engine file that deserialises is reused; one that does not
   (a JetPack upgrade changes TensorRT) is reported and rebuilt.
4. The build parses the ONNX file (parser errors name the file, node and message), adds a
   dynamic-batch optimisation profile (min 1, opt 1, max ``max_batch``), clears TF32 so fp32
   engines are real fp32, sets FP16 and DLA when asked, and reuses ONE timing cache file per
   device across every build, saved atomically after each one.

``verify_against`` compares an engine with a reference engine (ONNX Runtime) on the same
segment. The TensorRT calls in this module were written against NVIDIA's documented Python API
and have not been run on a GPU by their author; see ``docs/tensorrt.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import numpy as np
import onnx

from engines.base import Engine
from engines.errors import BuildError, EngineError, VerificationError
from engines.manifest import SegmentEntry
from engines.trt import (
    DeviceSignature,
    EngineIO,
    TrtSession,
    device_signature,
    parse_trt_version,
    require_supported,
)

__all__ = [
    "FP32_TOLERANCE",
    "Agreement",
    "BuiltSegment",
    "LoadOrBuild",
    "TrtBuildOptions",
    "TrtBuilder",
    "can_strip",
    "check_dla",
    "check_ops",
    "device_signature",
    "engine_filename",
    "engine_key",
    "load_or_build",
    "max_opset_for",
    "parser_build_error",
    "profile_shapes",
    "timing_cache_path",
    "unsupported_ops_for",
    "verify_against",
    "write_atomic",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

FP32_TOLERANCE = 1e-3  # TensorRT fp32 (TF32 off) against ONNX Runtime on the same segment
ENGINE_SUFFIX = ".engine"
_KEY_SCHEMA = "armdi-trt-engine-v1"
_KEY_LENGTH = 24  # hex digits of sha256 kept in file names


# --- options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrtBuildOptions:
    """How to build every engine of one ``armdi build --backend trt`` run."""

    fp16: bool = False
    max_batch: int = 8  # the profile's largest batch; host/device buffers are sized for it
    workspace_mb: int = 1024  # builder scratch memory limit (tactics needing more are skipped)
    dla_core: int | None = None  # run on this DLA core (Xavier/Orin), GPU fallback for the rest
    timing_cache: Path | None = None  # None: timing_cache_path(<engine dir>, device)
    # Weight-stripped plans (TensorRT 10+: BuilderFlag.STRIP_PLAN), refitted at load from the
    # segment's ONNX file. None: stripped wherever this TensorRT can strip.
    strip: bool | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.workspace_mb < 1:
            raise ValueError(f"workspace_mb must be at least 1, got {self.workspace_mb}")
        if self.dla_core is not None:
            if self.dla_core < 0:
                raise ValueError(f"dla_core must be 0 or more, got {self.dla_core}")
            if not self.fp16:
                # DLA runs FP16 and INT8 layers only; in fp32 every layer would fall back.
                raise ValueError("DLA runs FP16/INT8 only: set fp16=True with dla_core")

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    def stripped_for(self, trt_version: str) -> bool:
        """Whether plans built with ``trt_version`` are weight-stripped with these options."""
        can = can_strip(trt_version)
        if self.strip and not can:
            raise BuildError(f"TensorRT {trt_version} cannot build weight-stripped plans "
                             "(TensorRT 10 can: JetPack 6.1+); build full plans")
        return can if self.strip is None else self.strip


def can_strip(trt_version: str) -> bool:
    """TensorRT 10 builds weight-stripped plans (``BuilderFlag.STRIP_PLAN``) and refits them
    from an ONNX file (``OnnxParserRefitter``); 8.5/8.6 have neither."""
    return parse_trt_version(trt_version)[0] >= 10


# --- keys, file names, the timing cache ----------------------------------------------------


def engine_key(
    fingerprint: str,
    start: int,
    end: int,
    device: DeviceSignature,
    options: TrtBuildOptions,
    *,
    onnx_sha256: str | None = None,
) -> str:
    """A stable short hex key naming one engine; any field that changes the engine changes it.

    ``onnx_sha256`` (the segment file's hash) additionally ties the engine to the exact
    segment graph, so a re-cut model with the same fingerprint never reuses a stale engine.
    Workspace size and the timing cache path only affect build time, so they are not part
    of the key.
    """
    if not 0 <= start < end:
        raise ValueError(f"bad segment [{start}, {end})")
    fields = {
        "schema": _KEY_SCHEMA,
        "fingerprint": fingerprint,
        "segment": [start, end],
        "onnx_sha256": onnx_sha256,
        "trt_version": device.trt_version,
        "gpu": device.gpu_name,
        "compute_capability": list(device.compute_capability),
        "precision": options.precision,
        "profile": {"min": 1, "opt": 1, "max": options.max_batch},
        "dla_core": options.dla_core,
    }
    if options.stripped_for(device.trt_version):  # absent otherwise: older keys stay valid
        fields["weights"] = "stripped"
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:_KEY_LENGTH]


def engine_filename(key: str) -> str:
    """``<key>.engine``; refuses anything that is not a key (no paths sneak in)."""
    if len(key) != _KEY_LENGTH or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"not an engine key: {key!r}")
    return key + ENGINE_SUFFIX


def timing_cache_path(directory: Path, device: DeviceSignature) -> Path:
    """The one timing cache file of ``device`` under ``directory``, shared by all its builds."""
    return Path(directory) / f"timing-{device.slug}.cache"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class LoadOrBuild(Generic[T]):
    """Where the engine file is, what ``deserialize`` made of it, and whether it was built."""

    path: Path
    loaded: T
    built: bool
    note: str


def load_or_build(
    engine_dir: Path,
    key: str,
    build: Callable[[], bytes],
    deserialize: Callable[[bytes], T],
    note: Callable[[str], None] = log.info,
) -> LoadOrBuild[T]:
    """Reuse ``<engine_dir>/<key>.engine`` if it deserialises, else build and write it.

    ``deserialize`` raises ``EngineError`` for an engine it cannot load (TensorRT upgraded,
    other GPU, truncated file); such a file is treated as missing and rebuilt, with a note.
    A freshly built engine that does not deserialise is a ``BuildError``.
    """
    path = Path(engine_dir) / engine_filename(key)
    reason = "not built yet"
    if path.exists():
        try:
            loaded = deserialize(path.read_bytes())
        except EngineError as exc:
            reason = f"the existing engine does not load ({exc})"
            note(f"{path.name}: {reason}; rebuilding")
        else:
            return LoadOrBuild(path, loaded, built=False, note="reused")
    data = build()
    write_atomic(path, data)
    try:
        loaded = deserialize(data)
    except EngineError as exc:
        raise BuildError(f"the engine just built for {path.name} does not load: {exc}") from exc
    return LoadOrBuild(path, loaded, built=True, note=f"built ({reason})")


# --- what a TensorRT version can import ----------------------------------------------------

# Highest ONNX opset the bundled ONNX parser documents, per TensorRT release (docs/operators.md
# of onnx/onnx-tensorrt at each release: "TensorRT 8.5 supports operators up to Opset 17";
# TensorRT 8.6's README: "up to Opset 17"; "TensorRT 10.0 supports operators in the inclusive
# range of opset 9 to opset 20"; "TensorRT 10.15 ... opset 9 to opset 24"). A version between
# two entries gets the lower one, which is conservative.
_MAX_OPSET: dict[tuple[int, int], int] = {(8, 5): 17, (8, 6): 17, (10, 0): 20, (10, 15): 24}

# ONNX ops marked "N" (not supported) in onnx-tensorrt's docs/operators.md for TensorRT 8.5.
_UNSUPPORTED_8_5 = frozenset({
    "Bernoulli", "BitShift", "BlackmanWindow", "Compress", "ConcatFromSequence", "ConvInteger",
    "DFT", "Det", "DynamicQuantizeLinear", "HammingWindow", "HannWindow", "Hardmax", "IsInf",
    "LayerNormalization", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix",
    "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement",
    "OptionalHasElement", "QLinearConv", "QLinearMatMul", "STFT", "SequenceAt",
    "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
    "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringNormalizer",
    "TfIdfVectorizer", "Unique",
})
# ONNX ops marked "N" in the same table for TensorRT 10.15; used for every 10.x, where it may
# miss ops that early 10.x minors lacked but never names an op 10.x can import.
_UNSUPPORTED_10 = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr",
    "BitwiseXor", "CenterCropPad", "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger",
    "DFT", "Det", "DynamicQuantizeLinear", "ImageDecoder", "MatMulInteger", "MaxRoiPool",
    "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional",
    "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul",
    "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss",
    "SplitToSequence", "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer",
    "Unique",
})
# We found no operators.md for 8.6 itself; 8.6's release notes add LayerNormalization, and ops
# still missing in both 8.5 and 10.15 are taken as missing in 8.6 (again: no false alarms).
_UNSUPPORTED: dict[tuple[int, int], frozenset[str]] = {
    (8, 5): _UNSUPPORTED_8_5,
    (8, 6): _UNSUPPORTED_8_5 & _UNSUPPORTED_10,
    (10, 0): _UNSUPPORTED_10,
}
_DEFAULT_DOMAINS = ("", "ai.onnx")


def _table_lookup(table: dict[tuple[int, int], T], trt_version: str) -> T:
    major, minor, _ = require_supported(trt_version)
    known = [k for k in table if k[0] == major and k[1] <= minor]
    if not known:  # pragma: no cover - require_supported and the tables agree
        raise ValueError(f"no entry for TensorRT {trt_version}")
    return table[max(known)]


def max_opset_for(trt_version: str) -> int:
    """The highest ONNX opset this TensorRT version's parser documents (e.g. 8.6 -> 17)."""
    return _table_lookup(_MAX_OPSET, trt_version)


def unsupported_ops_for(trt_version: str) -> frozenset[str]:
    """ONNX op types this TensorRT version's parser documents as unsupported."""
    return _table_lookup(_UNSUPPORTED, trt_version)


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    """Every node, including those inside If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _all_nodes(sub)


def _node_label(node: onnx.NodeProto) -> str:
    return repr(node.name) if node.name else f"<unnamed, output {node.output[0]!r}>"


def check_ops(model: onnx.ModelProto, target: str) -> list[str]:
    """Why TensorRT ``target`` (e.g. ``"8.5.2"``) cannot import ``model``; empty when we know
    of no reason. A pre-flight check from the documented tables: an op it names is certainly
    unsupported, but the parser may still reject a graph this passes."""
    version = ".".join(str(p) for p in parse_trt_version(target)[:2])
    problems: list[str] = []
    opset = max(
        (o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), default=0
    )
    limit = max_opset_for(target)
    if opset > limit:
        problems.append(
            f"the model uses ONNX opset {opset}; TensorRT {version} parses up to opset {limit} "
            f"(re-export with opset {limit}, or convert with onnx.version_converter)"
        )
    unsupported = unsupported_ops_for(target)
    by_op: dict[str, list[str]] = {}
    for node in _all_nodes(model.graph):
        if node.domain not in _DEFAULT_DOMAINS:
            by_op.setdefault(f"{node.domain}::{node.op_type} (custom domain, needs a plugin)",
                             []).append(_node_label(node))
        elif node.op_type in unsupported:
            by_op.setdefault(node.op_type, []).append(_node_label(node))
        elif node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
            by_op.setdefault("MaxPool with an Indices output", []).append(_node_label(node))
    for op, nodes in sorted(by_op.items()):
        shown = ", ".join(nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
        problems.append(f"TensorRT {version} cannot import {op}: node {shown}")
    graph = model.graph
    strings = sorted({
        vi.name
        for vi in (*graph.input, *graph.output, *graph.value_info)
        if vi.type.tensor_type.elem_type == onnx.TensorProto.STRING
    } | {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.STRING})
    if strings:
        problems.append(f"TensorRT has no string tensors: {', '.join(strings)}")
    return problems


# --- parser errors -------------------------------------------------------------------------


class ParserErrorLike(Protocol):
    """What ``parser.get_error(i)`` returns (``tensorrt.ParserError``)."""

    def desc(self) -> str: ...

    def node(self) -> int: ...


def parser_build_error(
    parser: Any, onnx_path: Path, nodes: Sequence[tuple[str, str]] = ()
) -> BuildError:
    """One readable ``BuildError`` from an ``OnnxParser`` that failed on ``onnx_path``.

    ``nodes`` are ``(name, op_type)`` of the graph's nodes by index, to name the node when the
    parser (TensorRT 8.x) only gives its index.
    """
    parts = []
    for index in range(int(parser.num_errors)):
        error = parser.get_error(index)
        parts.append(_describe_parser_error(error, nodes))
    detail = "; ".join(parts) or "the parser gave no reason"
    return BuildError(f"TensorRT cannot parse {onnx_path}: {detail}")


def _describe_parser_error(error: Any, nodes: Sequence[tuple[str, str]]) -> str:
    message = str(error.desc()).strip().replace("\n", " ")
    code = getattr(error, "code", None)
    if callable(code):
        message = f"{str(code()).rsplit('.', 1)[-1]}: {message}"
    index = int(error.node())
    if index < 0:
        return message
    name, op = nodes[index] if index < len(nodes) else ("", "")
    # TensorRT 10 also reports the node's name and operator itself.
    name = _optional_text(error, "node_name") or name
    op = _optional_text(error, "node_operator") or op
    where = f"node {index}" + (f" {name!r}" if name else "") + (f" ({op})" if op else "")
    return f"{where}: {message}"


def _optional_text(obj: Any, method: str) -> str:
    """``obj.method()`` as text, or ``""`` where this TensorRT has no such method."""
    call = getattr(obj, method, None)
    return str(call() or "") if callable(call) else ""


# --- building ------------------------------------------------------------------------------


def profile_shapes(
    input_shape: Sequence[int], max_batch: int, dla: bool
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes for a dynamic-batch input: batch 1, 1, ``max_batch``.

    DLA has no dynamic dimensions (min = opt = max), so a DLA engine is built for exactly
    ``max_batch`` and the engine pads smaller batches.
    """
    if len(input_shape) < 1 or input_shape[0] != -1:
        raise BuildError(f"input shape {tuple(input_shape)} has no dynamic batch axis")
    if any(d < 1 for d in input_shape[1:]):
        raise BuildError(f"input shape {tuple(input_shape)}: only the batch axis may be dynamic")
    sample = tuple(int(d) for d in input_shape[1:])
    low = max_batch if dla else 1
    return (low, *sample), (low, *sample), (max_batch, *sample)


def check_dla(dla_core: int | None, num_dla_cores: int) -> None:
    """``BuildError`` unless ``dla_core`` is None or a DLA core this board has."""
    if dla_core is None:
        return
    if num_dla_cores == 0:
        raise BuildError("this device has no DLA (builder.num_DLA_cores is 0); build without "
                         "dla_core")
    if not 0 <= dla_core < num_dla_cores:
        raise BuildError(
            f"DLA core {dla_core} does not exist; this device has cores 0..{num_dla_cores - 1}"
        )


@dataclass(frozen=True)
class BuiltSegment:
    """One engine on disk for segment ``[start, end)``, ready for the manifest."""

    start: int
    end: int
    key: str
    path: Path
    precision: str
    built: bool
    note: str
    io: EngineIO
    stripped: bool = False  # a weight-stripped plan: refit from its ONNX file at load

    def to_segment_entry(self, model_dir: Path) -> SegmentEntry:
        return SegmentEntry(
            start=self.start,
            end=self.end,
            path=self.path.relative_to(model_dir).as_posix(),
            precision=self.precision,
            key=self.key,
        )


def _node_table(onnx_path: Path) -> list[tuple[str, str]]:
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # the parser's own message will say what is wrong with the file
        return []
    return [(node.name, node.op_type) for node in model.graph.node]


class TrtBuilder:
    """Builds the engines of one device with one set of options and one timing cache."""

    def __init__(self, session: TrtSession, options: TrtBuildOptions, engine_dir: Path) -> None:
        self.session = session
        self.options = options
        self.engine_dir = Path(engine_dir)
        self.device = session.device
        self.timing_cache = options.timing_cache or timing_cache_path(self.engine_dir, self.device)
        self.stripped = options.stripped_for(self.device.trt_version)  # refuses strip on 8.x
        if options.dla_core is not None:
            cores = session.run(self._count_dla_cores, "querying the DLA cores")
            check_dla(options.dla_core, cores)

    def _count_dla_cores(self) -> int:
        return int(self.session.trt.Builder(self.session.logger).num_DLA_cores)

    def build_segment(
        self,
        onnx_path: Path,
        *,
        fingerprint: str,
        start: int,
        end: int,
        onnx_sha256: str | None = None,
        note: Callable[[str], None] = log.info,
    ) -> BuiltSegment:
        """The engine of ``[start, end)``: reused when present and loadable, else built."""
        onnx_path = Path(onnx_path)
        problems = check_ops(onnx.load(str(onnx_path), load_external_data=False),
                             self.device.trt_version)
        key = engine_key(fingerprint, start, end, self.device, self.options,
                         onnx_sha256=onnx_sha256)
        stripped = self.options.stripped_for(self.device.trt_version)
        if problems:
            raise BuildError(f"{onnx_path.name}: " + "; ".join(problems))
        result = load_or_build(
            self.engine_dir,
            key,
            build=lambda: self.build_serialized(onnx_path),
            deserialize=self.session.probe,
            note=note,
        )
        return BuiltSegment(start, end, key, result.path, self.options.precision,
                            result.built, result.note, result.loaded, stripped)

    def build_serialized(self, onnx_path: Path) -> bytes:
        """Parse ``onnx_path`` and build a serialised engine on the CUDA thread."""
        return self.session.run(lambda: self._build(Path(onnx_path)), f"building {onnx_path}")

    def _build(self, onnx_path: Path) -> bytes:
        trt, options = self.session.trt, self.options
        builder = trt.Builder(self.session.logger)
        # TensorRT 8 needs EXPLICIT_BATCH; in 10 every network is explicit-batch.
        flags = 0
        if self.session.api == "bindings":
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.session.logger)
        if not parser.parse_from_file(str(onnx_path)):  # resolves external weights by path
            raise parser_build_error(parser, onnx_path, _node_table(onnx_path))

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: compared at 1e-3
        if options.stripped_for(self.device.trt_version):
            # TensorRT 10: leave the refittable weights out of the plan; they are refitted at
            # load from the same ONNX file (OnnxParserRefitter). REFIT_IDENTICAL promises the
            # same weights, so the builder may still optimise as if they were constants.
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)
            config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
        if options.fp16:
            if not builder.platform_has_fast_fp16:
                log.warning("this GPU has no fast FP16; the fp16 engine may be slow")
            config.set_flag(trt.BuilderFlag.FP16)
        if options.dla_core is not None:
            check_dla(options.dla_core, int(builder.num_DLA_cores))
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = options.dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)

        profile = builder.create_optimization_profile()
        for index in range(network.num_inputs):
            tensor = network.get_input(index)
            shape = tuple(int(d) for d in tensor.shape)
            if shape and shape[0] == -1:
                low, opt, high = profile_shapes(shape, options.max_batch,
                                                options.dla_core is not None)
                profile.set_shape(tensor.name, low, opt, high)
            elif any(d < 0 for d in shape):
                raise BuildError(f"{onnx_path.name}: input {tensor.name!r} has shape {shape}; "
                                 "only the batch axis may be dynamic")
        config.add_optimization_profile(profile)

        self._attach_timing_cache(config)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BuildError(f"TensorRT could not build {onnx_path} (see its log above)")
        write_atomic(self.timing_cache, bytes(config.get_timing_cache().serialize()))
        return bytes(serialized)

    def _attach_timing_cache(self, config: Any) -> None:
        """Load this device's timing cache into ``config``; start a fresh one if it is stale."""
        try:
            data = self.timing_cache.read_bytes()
        except FileNotFoundError:
            data = b""
        try:
            cache = config.create_timing_cache(data)
            if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
                return
            reason = "it is from another TensorRT or GPU"
        except Exception as exc:  # a truncated or corrupt file
            reason = f"it does not load ({exc})"
        log.warning("timing cache %s: %s; starting a new one", self.timing_cache, reason)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


# --- verification against a reference engine ----------------------------------------------


class Agreement(NamedTuple):
    max_abs_error: float
    top1_agreement: float  # fraction of samples whose argmax matches (final segment: labels)


def verify_against(
    reference: Engine,
    candidate: Engine,
    inputs: np.ndarray | Iterable[np.ndarray],
    precision: str,
    *,
    final_segment: bool = True,
    min_top1: float = 1.0,
) -> Agreement:
    """Run both engines on ``inputs`` (one batch or several) and compare the outputs.

    fp32 passes when the max abs error is at most ``FP32_TOLERANCE``. fp16 passes when, for
    the final segment (logits), the top-1 class agrees on at least ``min_top1`` of the
    samples; an intermediate fp16 segment only has to be finite. Failing raises
    ``VerificationError``; passing returns the measurements.
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
    batches = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
    if not batches:
        raise ValueError("verify_against needs at least one input batch")
    max_error, agree, samples = 0.0, 0, 0
    for batch in batches:
        want = np.asarray(reference.infer(batch))
        got = np.asarray(candidate.infer(batch))
        if want.shape != got.shape:
            raise VerificationError(
                f"{candidate.backend}[{candidate.start},{candidate.end}) returned shape "
                f"{got.shape}, the reference {want.shape}"
            )
        if not np.all(np.isfinite(got)):
            raise VerificationError(
                f"{candidate.backend}[{candidate.start},{candidate.end}) returned NaN or inf"
            )
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        max_error = max(max_error, float(diff.max(initial=0.0)))
        flat_want = want.reshape(want.shape[0], -1)
        flat_got = got.reshape(got.shape[0], -1)
        agree += int(np.sum(flat_want.argmax(axis=1) == flat_got.argmax(axis=1)))
        samples += want.shape[0]
    result = Agreement(max_error, agree / samples)
    label = f"{candidate.backend}[{candidate.start},{candidate.end}) {precision}"
    if precision == "fp32" and result.max_abs_error > FP32_TOLERANCE:
        raise VerificationError(
            f"{label}: max abs error {result.max_abs_error:.3g} against {reference.backend} "
            f"exceeds {FP32_TOLERANCE:g}"
        )
    if precision == "fp16" and final_segment and result.top1_agreement < min_top1:
        raise VerificationError(
            f"{label}: top-1 agrees with {reference.backend} on {result.top1_agreement:.1%} "
            f"of {samples} samples, needs {min_top1:.0%}"
        )
    return result
