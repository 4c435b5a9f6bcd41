"""What a TensorRT build would make and cost, before anything is built (``--plan``).

A TensorRT plan embeds the weights of its segment, so prebuilding every segment ``[i, j)``
copies each block's weights into every segment that holds it. A *weight-stripped* plan
(TensorRT 10, ``BuilderFlag.STRIP_PLAN``) keeps only the network and its kernels' choices and
is refitted at load from the segment's ONNX file, which already points into the shared
``weights.bin``. This module estimates both kinds from the ONNX segments alone, so it runs on
any machine, TensorRT or not:

- per block, the weights its graph reads (byte ranges of ``weights.bin`` plus inline
  initializers), its node count and its graph file's size; a segment's weights are the union
  of its blocks' (a weight read by two blocks counts once);
- a plan's size: ``PLAN_BYTES_PER_ENGINE + PLAN_BYTES_PER_NODE * nodes`` for the network,
  plus the weights (halved for fp16) unless stripped;
- the build time: engines times a per-engine figure, measured on this device (the journal of
  earlier builds) when there is one, else ``ASSUMED_SECONDS_PER_ENGINE``.

It also orders the segments "most likely first" (``likely_order``): block engines, then fused
segments by how far their ends lie from the boundaries of the allocator's optimum, widening
outward, and decides what a build may do within the free disk and ``--max-disk``
(``decide``). Pure functions of their inputs; the CLI prints the ``TrtPlan``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

if TYPE_CHECKING:
    from builder.build import BuildOptions

# Assumptions, stated wherever a figure uses them (replaced by measurements where known).
PLAN_BYTES_PER_ENGINE = 32 * 1024  # serialised engine header, bindings, profile, tactics
PLAN_BYTES_PER_NODE = 1024  # per ONNX node of the segment: layer and kernel records
ASSUMED_SECONDS_PER_ENGINE = 15.0  # Jetson Orin, TensorRT 10, warm timing cache
ASSUMPTION_NOTE = (
    "assumed for a Jetson Orin with TensorRT 10 and a warm timing cache; measured on this "
    "device once it has built engines"
)
PLAN_SIZE_NOTE = (
    f"plan size assumed {PLAN_BYTES_PER_ENGINE // 1024} KiB per engine + "
    f"{PLAN_BYTES_PER_NODE // 1024} KiB per ONNX node, plus the weights (fp32 as stored, "
    "fp16 half) unless stripped"
)


PREBUILD_RATIO = 1.5  # default: prebuild until the repository is 1.5x the ONNX model
LIKELY_WORKERS = 3  # without a cluster: the optimum of three identical devices (armdi up)


@dataclass(frozen=True)
class TrtPlanOptions:
    """How a TensorRT build spends disk: a hard limit, how much to prebuild, and around
    which boundaries (the allocator's optimum for the configured cluster) to start."""

    max_disk: int | None = None  # refuse a build that adds more bytes than this
    prebuild_ratio: float | None = PREBUILD_RATIO  # None or 0: prebuild every segment
    boundaries: tuple[int, ...] | None = None  # the optimum of the configured cluster
    workers: int = LIKELY_WORKERS  # without boundaries: this many identical devices
    plan_only: bool = False  # --plan: print the plan, build nothing

    def __post_init__(self) -> None:
        if self.max_disk is not None and self.max_disk <= 0:
            raise ValueError("--max-disk must be a positive size")
        if self.prebuild_ratio is not None and self.prebuild_ratio < 0:
            raise ValueError("--prebuild-ratio must be 0 or more")

    def build_kwargs(self, segments: str) -> dict[str, Any]:
        """The keyword arguments of ``trt_stage.build_trt``."""
        return {"max_disk": self.max_disk, "prebuild_ratio": self.prebuild_ratio or None,
                "boundaries": self.boundaries, "workers": self.workers, "segments": segments}


# --- what the segments hold -----------------------------------------------------------------


@dataclass(frozen=True)
class BlockStats:
    """What one block's graph holds: weight byte ranges in the shared file, inline bytes,
    nodes and the size of its own graph file."""

    weights: frozenset[tuple[int, int]]  # (offset, length) in weights.bin
    inline_bytes: int
    nodes: int
    graph_bytes: int
    frame_bytes: int = 0  # of graph_bytes: the model header and the input/output records,
    #                       written once per segment file however many blocks it holds


def block_stats(model: onnx.ModelProto, graph_bytes: int | None = None) -> BlockStats:
    """The stats of one segment/block graph loaded without its external data."""
    refs: set[tuple[int, int]] = set()
    inline = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in init.external_data}
            refs.add((int(entries.get("offset", 0)), int(entries.get("length", 0))))
        else:
            inline += len(init.raw_data) or init.ByteSize()
    size = graph_bytes if graph_bytes is not None else model.ByteSize()
    frame = onnx.ModelProto()
    frame.CopyFrom(model)
    del frame.graph.node[:]
    del frame.graph.initializer[:]
    return BlockStats(frozenset(refs), inline, len(model.graph.node), size,
                      min(size, frame.ByteSize()))


@dataclass(frozen=True)
class ModelStats:
    """The figures a plan needs about one model's ONNX segments."""

    model_id: str
    blocks: tuple[BlockStats, ...]
    weights_bytes: int  # the shared weights file
    full_graph_bytes: int  # model.onnx without its weights
    segment_graph_bytes: dict[tuple[int, int], int] = field(default_factory=dict)  # on disk
    onnx_built: bool = True  # the ONNX Runtime repository is already on disk

    @property
    def onnx_model_bytes(self) -> int:
        """The ONNX model: its graph and its weights (what the repository is compared with)."""
        return self.full_graph_bytes + self.weights_bytes

    def segment_weights(self, start: int, end: int) -> int:
        refs: set[tuple[int, int]] = set()
        for block in self.blocks[start:end]:
            refs |= block.weights
        return sum(length for _, length in refs) + sum(b.inline_bytes
                                                       for b in self.blocks[start:end])

    def segment_nodes(self, start: int, end: int) -> int:
        return sum(b.nodes for b in self.blocks[start:end])

    def segment_graph(self, start: int, end: int) -> int:
        known = self.segment_graph_bytes.get((start, end))
        if known is not None:
            return known
        parts = self.blocks[start:end]
        # The blocks' nodes and initializer records, plus one frame (header, input, output).
        frame = (parts[0].frame_bytes + parts[-1].frame_bytes) // 2
        return frame + sum(b.graph_bytes - b.frame_bytes for b in parts)


def stats_from_model_dir(model_dir: Path, model_id: str, blocks: int) -> ModelStats:
    """Stats of a built model directory (its block files and every segment file present)."""
    from builder.segments import WEIGHTS_FILE, segment_filename

    stats = []
    for k in range(blocks):
        path = model_dir / segment_filename(k, k + 1)
        model = onnx.load(str(path), load_external_data=False)
        stats.append(block_stats(model, path.stat().st_size))
    graphs = {}
    for path in model_dir.glob("seg_*_*.onnx"):
        _, i, j = path.stem.split("_")
        graphs[(int(i), int(j))] = path.stat().st_size
    return ModelStats(model_id, tuple(stats), (model_dir / WEIGHTS_FILE).stat().st_size,
                      (model_dir / "model.onnx").stat().st_size, graphs, onnx_built=True)


def stats_from_onnx(onnx_path: Path, model_id: str, workdir: Path,
                    segments: str = "blocks") -> ModelStats:
    """Stats of a model not built yet: cut it into blocks in ``workdir`` the way
    ``armdi build`` would, and measure the graph of every segment ``segments`` asks for in
    memory (nothing but the weights file is written, nothing is verified)."""
    from builder import graph as graph_mod
    from builder import segments as seg_mod

    model = onnx.load(str(onnx_path))
    graph_mod.sort_nodes(model)
    analysis = graph_mod.analyse(model)
    light = seg_mod.externalize(model, workdir / seg_mod.WEIGHTS_FILE)
    del model
    infos = seg_mod.value_infos(light)  # as the build does: from the stored graph
    stats = [block_stats(seg_mod.extract(light, analysis, infos, k, k + 1))
             for k in range(analysis.blocks)]
    graphs = {(i, j): seg_mod.extract(light, analysis, infos, i, j).ByteSize()
              for i, j in seg_mod.segment_ranges(analysis.blocks, segments) if j - i > 1}
    return ModelStats(model_id, tuple(stats), (workdir / seg_mod.WEIGHTS_FILE).stat().st_size,
                      light.ByteSize(), graphs, onnx_built=False)


# --- the most likely segments first ----------------------------------------------------------


def balanced_boundaries(block_ms: Sequence[float], workers: int) -> tuple[int, ...]:
    """Boundaries splitting the blocks into ``workers`` runs of near-equal summed time: the
    allocator's optimum for identical devices on free links (the likely centre of moves)."""
    blocks = len(block_ms)
    workers = max(1, min(workers, blocks))
    total = sum(block_ms) or float(blocks)
    times = block_ms if sum(block_ms) > 0 else [1.0] * blocks
    bounds, acc = [0], 0.0
    for k, t in enumerate(times):
        acc += t
        want = len(bounds) * total / workers
        left = blocks - (k + 1)
        if len(bounds) < workers and (acc >= want or left == workers - len(bounds)) and left:
            bounds.append(k + 1)
    bounds.append(blocks)
    return tuple(bounds)


def segment_distance(start: int, end: int, boundaries: Sequence[int]) -> int:
    """How many blocks the ends of ``[start, end)`` lie from one worker's optimal range."""
    pairs = [(a, b) for a, b in itertools.pairwise(boundaries) if b > a]
    if not pairs:
        return 0
    return min(max(abs(start - a), abs(end - b)) for a, b in pairs)


def likely_order(ranges: Iterable[tuple[int, int]],
                 boundaries: Sequence[int] | None) -> list[tuple[int, int]]:
    """Block engines first (in block order), then fused segments by distance from the
    optimum's ranges, widening outward (ties: shorter first, then by start)."""
    wanted = sorted(set(ranges))
    blocks = [r for r in wanted if r[1] - r[0] == 1]
    fused = [r for r in wanted if r[1] - r[0] > 1]
    if boundaries is None:
        return blocks + sorted(fused, key=lambda r: (r[1] - r[0], r))
    bounds = tuple(boundaries)
    return blocks + sorted(fused, key=lambda r: (segment_distance(r[0], r[1], bounds),
                                                 r[1] - r[0], r))


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanKind:
    """Which plans this machine's TensorRT makes."""

    trt_version: str | None  # None: TensorRT is not installed here
    stripped: bool  # TensorRT 10+: weight-stripped plans refitted at load

    @property
    def note(self) -> str:
        if self.trt_version is None:
            return ("TensorRT is not installed here: figures for TensorRT 10 (stripped plans, "
                    "JetPack 6.1+) and 8.x (full plans, JetPack 5.1/6.0) are both shown")
        if self.stripped:
            return (f"TensorRT {self.trt_version}: weight-stripped plans, refitted at load "
                    "from each segment's ONNX file (shared weights.bin)")
        return (f"TensorRT {self.trt_version} cannot strip weights from plans (TensorRT 10 "
                "can): every plan carries its segment's weights, so the build chooses the "
                "most likely segments within the disk budget")


def plan_kind(trt_version: str | None) -> PlanKind:
    if trt_version is None:
        return PlanKind(None, stripped=True)
    from engines.trt import parse_trt_version

    return PlanKind(trt_version, stripped=parse_trt_version(trt_version)[0] >= 10)


def plan_bytes(stats: ModelStats, start: int, end: int, *, stripped: bool,
               fp16: bool = False, per_engine: int = PLAN_BYTES_PER_ENGINE,
               per_node: int = PLAN_BYTES_PER_NODE) -> int:
    network = per_engine + per_node * stats.segment_nodes(start, end)
    if stripped:
        return network
    weights = stats.segment_weights(start, end)
    return network + (weights // 2 if fp16 else weights)


@dataclass(frozen=True)
class Prebuild:
    """The engines a build makes now, most likely first, and the repository it leaves."""

    ranges: tuple[tuple[int, int], ...]
    plans_bytes: int
    repository_bytes: int


@dataclass(frozen=True)
class TrtPlan:
    """What ``armdi build --backend trt`` would build and cost; printed by ``--plan``."""

    model_id: str
    blocks: int
    segments: str
    engines: int  # every engine --segments asks for (block engines included)
    fp16: bool
    tensorrt: str | None
    stripped: bool  # the plans this machine's TensorRT makes (stripped where unknown)
    onnx_model_bytes: int
    onnx_repository_bytes: int  # segment graphs + weights + the full graph
    stripped_plans_bytes: int  # every engine asked for, stripped
    full_plans_bytes: int  # every engine asked for, with their weights
    prebuild_ratio: float | None
    prebuild_stripped: Prebuild  # built now with stripped plans, most likely first
    prebuild_full: Prebuild  # built now with full plans
    seconds_per_engine: float
    seconds_source: str
    build_seconds: float  # the engines this machine builds now
    build_seconds_all: float  # every engine asked for
    free_disk_bytes: int
    max_disk_bytes: int | None
    needed_bytes: int  # what this build adds to the disk with the plans this machine makes
    refused: str | None
    notes: tuple[str, ...]

    @property
    def repository_stripped_bytes(self) -> int:
        return self.onnx_repository_bytes + self.stripped_plans_bytes

    @property
    def repository_full_bytes(self) -> int:
        return self.onnx_repository_bytes + self.full_plans_bytes

    @property
    def prebuild(self) -> tuple[tuple[int, int], ...]:
        """What this machine builds now (nothing when refused)."""
        if self.refused:
            return ()
        return (self.prebuild_stripped if self.stripped else self.prebuild_full).ranges

    def ratio(self, size: int) -> float:
        return round(size / max(1, self.onnx_model_bytes), 3)

    def to_json(self) -> dict[str, Any]:
        def prebuild(p: Prebuild) -> dict[str, Any]:
            return {"engines": len(p.ranges), "plans_bytes": p.plans_bytes,
                    "repository_bytes": p.repository_bytes,
                    "repository_ratio": self.ratio(p.repository_bytes),
                    "first": [list(r) for r in p.ranges[:6]],
                    "first_fused": [list(r) for r in p.ranges if r[1] - r[0] > 1][:6]}

        return {
            "model_id": self.model_id, "blocks": self.blocks, "segments": self.segments,
            "engines": self.engines, "precision": "fp16" if self.fp16 else "fp32",
            "tensorrt": self.tensorrt, "stripped": self.stripped,
            "onnx_model_bytes": self.onnx_model_bytes,
            "onnx_repository_bytes": self.onnx_repository_bytes,
            "all": {"stripped_plans_bytes": self.stripped_plans_bytes,
                    "full_plans_bytes": self.full_plans_bytes,
                    "repository_stripped_bytes": self.repository_stripped_bytes,
                    "repository_full_bytes": self.repository_full_bytes,
                    "repository_stripped_ratio": self.ratio(self.repository_stripped_bytes),
                    "repository_full_ratio": self.ratio(self.repository_full_bytes),
                    "build_seconds": round(self.build_seconds_all, 1)},
            "prebuild_ratio": self.prebuild_ratio,
            "prebuild_stripped": prebuild(self.prebuild_stripped),
            "prebuild_full": prebuild(self.prebuild_full),
            "seconds_per_engine": self.seconds_per_engine,
            "seconds_source": self.seconds_source,
            "build_seconds": round(self.build_seconds, 1),
            "free_disk_bytes": self.free_disk_bytes, "max_disk_bytes": self.max_disk_bytes,
            "needed_bytes": self.needed_bytes, "refused": self.refused,
            "notes": list(self.notes),
        }

    def render(self) -> str:
        mb = 1e6

        def line(label: str, plans: int, repo: int, engines: int) -> str:
            return (f"  {label:<22}{engines:>5} engines, plans {plans / mb:,.1f} MB, "
                    f"repository {repo / mb:,.1f} MB ({self.ratio(repo):.2f}x the model)")

        kind = "stripped" if self.stripped else "full"
        lines = [
            f"TensorRT build plan for {self.model_id} ({self.blocks} blocks, --segments "
            f"{self.segments}, {'fp16' if self.fp16 else 'fp32'})",
            f"  ONNX model            {self.onnx_model_bytes / mb:,.1f} MB "
            f"(ONNX repository {self.onnx_repository_bytes / mb:,.1f} MB)",
            line("all, stripped plans", self.stripped_plans_bytes,
                 self.repository_stripped_bytes, self.engines),
            line("all, full plans", self.full_plans_bytes, self.repository_full_bytes,
                 self.engines),
            line("now, stripped plans", self.prebuild_stripped.plans_bytes,
                 self.prebuild_stripped.repository_bytes, len(self.prebuild_stripped.ranges)),
            line("now, full plans", self.prebuild_full.plans_bytes,
                 self.prebuild_full.repository_bytes, len(self.prebuild_full.ranges)),
            f"  build time            now {_duration(self.build_seconds)}, all "
            f"{_duration(self.build_seconds_all)} ({self.seconds_per_engine:g} s per engine, "
            f"{self.seconds_source})",
            f"  free disk             {self.free_disk_bytes / mb:,.1f} MB"
            + ("" if self.max_disk_bytes is None
               else f" (--max-disk {self.max_disk_bytes / mb:,.1f} MB)"),
            f"  this build adds       {self.needed_bytes / mb:,.1f} MB ({kind} plans)",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if self.refused:
            lines.append(f"  REFUSED: {self.refused}")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def free_disk(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return int(shutil.disk_usage(path).free)




def _prebuild(order: Sequence[tuple[int, int]], sizes: dict[tuple[int, int], int],
              onnx_repo: int, model_bytes: int, ratio: float | None) -> Prebuild:
    """Block engines always, then the most likely fused segments while the repository stays
    within ``ratio`` times the ONNX model (``None``: every engine)."""
    chosen, plans = [], 0
    limit = math.inf if ratio is None else ratio * model_bytes
    for r in order:
        if r[1] - r[0] > 1 and onnx_repo + plans + sizes[r] > limit:
            break
        chosen.append(r)
        plans += sizes[r]
    return Prebuild(tuple(chosen), plans, onnx_repo + plans)


def make_plan(stats: ModelStats, ranges: Sequence[tuple[int, int]], *, segments: str,
              kind: PlanKind, fp16: bool, free_disk_bytes: int,
              max_disk_bytes: int | None = None, boundaries: Sequence[int] | None = None,
              seconds_per_engine: float | None = None,
              prebuild_ratio: float | None = PREBUILD_RATIO,
              done: Iterable[tuple[int, int]] = (), workers: int = LIKELY_WORKERS) -> TrtPlan:
    """The plan for ``ranges`` (block engines are always added).

    A build makes the block engines, then fused segments most likely first while the
    repository stays within ``prebuild_ratio`` times the ONNX model; nodes chain block
    engines for the rest and ask for them to be built on demand. It is refused, with this
    plan, when what it adds to the disk exceeds the free disk or ``--max-disk``.
    """
    blocks = len(stats.blocks)
    wanted = set(ranges) | {(k, k + 1) for k in range(blocks)}
    if boundaries is None or boundaries[-1] != blocks:
        boundaries = balanced_boundaries([1.0] * blocks, workers)
    order = likely_order(wanted, boundaries)
    already = set(done)
    stripped_sizes = {r: plan_bytes(stats, *r, stripped=True, fp16=fp16) for r in order}
    full_sizes = {r: plan_bytes(stats, *r, stripped=False, fp16=fp16) for r in order}
    graphs = sum(stats.segment_graph(*r) for r in order)
    onnx_repo = stats.full_graph_bytes + stats.weights_bytes + graphs
    model = stats.onnx_model_bytes
    pre_stripped = _prebuild(order, stripped_sizes, onnx_repo, model, prebuild_ratio)
    pre_full = _prebuild(order, full_sizes, onnx_repo, model, prebuild_ratio)
    mine, sizes = ((pre_stripped, stripped_sizes) if kind.stripped else (pre_full, full_sizes))
    todo = [r for r in mine.ranges if r not in already]
    needed = (0 if stats.onnx_built else onnx_repo) + sum(sizes[r] for r in todo)
    budget = min(free_disk_bytes, max_disk_bytes if max_disk_bytes is not None else math.inf)
    per_engine = (seconds_per_engine if seconds_per_engine is not None
                  else ASSUMED_SECONDS_PER_ENGINE)
    notes = [kind.note, PLAN_SIZE_NOTE]
    if len(mine.ranges) < len(order):
        notes.append(f"{len(order) - len(mine.ranges)} fused segments are left to be built on "
                     "demand (nodes chain block engines meanwhile); --prebuild-ratio 0 "
                     "prebuilds them all")
    refused = None
    if needed > budget:
        limit = ("--max-disk" if max_disk_bytes is not None and max_disk_bytes < free_disk_bytes
                 else "the free disk")
        refused = (f"this build adds {needed / 1e6:,.1f} MB, more than {limit} "
                   f"({budget / 1e6:,.1f} MB): lower --prebuild-ratio, choose fewer segments "
                   "(--segments window:W) or free disk")
    return TrtPlan(
        model_id=stats.model_id, blocks=blocks, segments=segments, engines=len(order),
        fp16=fp16, tensorrt=kind.trt_version, stripped=kind.stripped,
        onnx_model_bytes=model, onnx_repository_bytes=onnx_repo,
        stripped_plans_bytes=sum(stripped_sizes.values()),
        full_plans_bytes=sum(full_sizes.values()), prebuild_ratio=prebuild_ratio,
        prebuild_stripped=pre_stripped, prebuild_full=pre_full,
        seconds_per_engine=round(per_engine, 2),
        seconds_source=("measured on this device" if seconds_per_engine is not None
                        else ASSUMPTION_NOTE),
        build_seconds=per_engine * len(todo),
        build_seconds_all=per_engine * len([r for r in order if r not in already]),
        free_disk_bytes=free_disk_bytes, max_disk_bytes=max_disk_bytes, needed_bytes=needed,
        refused=refused, notes=tuple(notes),
    )


# --- the plan of a build, from its options (``armdi build --plan``) --------------------------


def plan_build(options: BuildOptions) -> TrtPlan:
    """The plan of ``armdi build`` with ``options`` and ``--backend trt``, building nothing.

    It reads the model's ONNX build when the repository holds it; otherwise it exports the
    named model (or reads the ONNX file) into a temporary folder and cuts it into blocks.
    TensorRT is not needed: where it is absent, both kinds of plan are shown.
    """
    import tempfile

    from builder.segments import segment_ranges
    from engines.repository import ModelRepository

    repository = ModelRepository(options.repo)
    model_id = options.name or (Path(options.model).stem if options.model.endswith(".onnx")
                                else options.model)
    trt_version, device_slug = _tensorrt_here()
    kind = plan_kind(trt_version)
    shipped = None
    if repository.has_model(model_id) and not options.model.endswith(".onnx"):
        from builder.shipped import shipped_model

        shipped = shipped_model(dataclasses.replace(options, backend="trt"))
    if shipped is not None:
        stats = stats_from_model_dir(repository.model_dir(model_id), model_id, shipped.blocks)
        block_ms: Sequence[float] = next(iter(shipped.profiles.values())).block_ms \
            if shipped.profiles else [1.0] * shipped.blocks
        return _plan(stats, options, kind, device_slug, block_ms)
    from builder.sources import resolve

    with tempfile.TemporaryDirectory(prefix="armdi-plan-") as tmp:
        work = Path(tmp)
        source = resolve(options.model, work, weights=options.weights, name=options.name,
                         input_size=options.input_size, opset=options.opset)
        (work / "cut").mkdir()
        segment_ranges(2, options.segments)  # validate the option before the work
        stats = stats_from_onnx(source.onnx_path, source.model_id, work / "cut",
                                options.segments)
    return _plan(stats, options, kind, device_slug, [1.0] * len(stats.blocks))


def _plan(stats: ModelStats, options: BuildOptions, kind: PlanKind, device_slug: str | None,
          block_ms: Sequence[float]) -> TrtPlan:
    from builder.segments import segment_ranges
    from builder.trt_resume import measured_seconds_per_engine

    blocks = len(stats.blocks)
    cache = Path(options.repo) / ".trt-cache"
    measured = (measured_seconds_per_engine(cache, device_slug)
                if device_slug is not None else None)
    boundaries = options.trt.boundaries or balanced_boundaries(block_ms, options.trt.workers)
    return make_plan(stats, segment_ranges(blocks, options.segments), segments=options.segments,
                     kind=kind, fp16=options.fp16, free_disk_bytes=free_disk(options.repo),
                     max_disk_bytes=options.trt.max_disk, boundaries=boundaries,
                     seconds_per_engine=measured,
                     prebuild_ratio=options.trt.prebuild_ratio or None)


def _tensorrt_here() -> tuple[str | None, str | None]:
    """This machine's TensorRT version and device slug, or None where absent."""
    from engines.errors import BackendUnavailableError
    from engines.trt import device_signature, import_tensorrt

    try:
        version = str(import_tensorrt().__version__)
    except BackendUnavailableError:
        return None, None
    try:
        return version, device_signature().slug
    except BackendUnavailableError:
        return version, None
