"""``armdi bench adaptive``: AR-MDI against the static optimum (EdgePipe) and an equal split,
on a local 3-worker cluster, through heterogeneity and a change at run time.

Scenarios, each run once per mode on a cluster of its own:

- **a** static heterogeneity: the workers are 1x / 2x / 4x slower from the start;
- **bc** one worker (w2) goes from 1x to 4x at ``change_s`` (b), and back to 1x at
  ``back_s`` (c);
- **he** two identical workers at rest, compute emulated with the **measured** times of the
  fused segments: block times profiled one by one misjudge fused segments, so the profile's
  split is off even for identical workers. Before the runs the bench times every fused
  segment a 2-worker split can give (``[0, k)`` and ``[k, blocks)``, ONNX Runtime on this
  machine, interleaved rounds, medians) and the workers wait those times. The summary's
  ``homogeneous_spread`` is how far armdi's settled stage times (each worker's median over
  the second half's snapshots on the final split) are from equal (max / min - 1), beside the
  spread of that table's fastest split (``homogeneous_best_spread``, at
  ``homogeneous_best_boundary``).
- **h** the same two workers pinned to one core each, always with real compute (the
  summary's ``homogeneous_spread_real``): on a 2-core machine shared with the source and the
  client, what a split measures drifts by ~10 % between runs.

Modes: ``armdi`` (the controller moves the boundaries), ``edgepipe`` (the exact optimum at
start, from the configured slowdowns, then static), ``equal`` (every worker the same number
of blocks, static). The load is a closed loop keeping ``window`` requests in flight.

Two workers and a source cannot compute in parallel faithfully on 2 cores, let alone three,
so by default compute is **emulated**: a node waits its segment's profiled time (times
``time_scale`` and its slowdown) and outputs zeros. That is labelled in the JSON and in the
report; ``--real`` runs the same scenarios with real compute, for comparison.

For each run: throughput per second over time, p50/p99 latency, boundary moves, failed
requests, and the exact optimum's predicted throughput at the true speeds (the profile times
the slowdowns, at every moment of the scenario). The summary has ``steady_ratio_to_optimum``
(scenario a, armdi, over its second half), ``recovery_s`` (scenario b, armdi: from the change
until a 1 s window is within 10 % of the new optimum and stays so for 2 s),
``failed_requests`` per mode and ``moves_per_30s_steady`` (scenario a, armdi, second half),
``homogeneous_spread`` and ``moves_per_30s_rest`` (scenario he; with ``_real``: h), and the
time from a move's decision to the first frame run with the new range (``swap_ms``) and the
fused engines' load times (``fused_load_ms``), over every armdi run.
A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.bench import _quantile, load_avg, machine_info
from appliance.control.allocator import even_split, snapshot_from_profile, solve
from engines.base import Engine
from engines.errors import ArmdiError
from engines.manifest import Manifest
from engines.repository import ModelRepository

MODES = ("armdi", "edgepipe", "equal")
SCENARIOS = ("a", "bc", "he", "h")
SLOW = 4.0


@dataclass(frozen=True)
class AdaptiveBenchOptions:
    repo: Path
    model: str = "efficientnet_lite0"
    workers: int = 3
    duration_s: float = 40.0
    change_s: float = 10.0
    back_s: float = 25.0
    window: int = 8
    emulate: bool = True
    time_scale: float = 4.0
    modes: tuple[str, ...] = MODES
    scenarios: tuple[str, ...] = SCENARIOS
    fused_rounds: int = 30  # scenario he: timings of each fused segment (medians)
    hysteresis: float | None = None  # the controller's (None: the default)


@dataclass(frozen=True)
class _Scenario:
    name: str
    start: tuple[float, ...]
    changes: tuple[tuple[float, str, float], ...]  # (at s, node, factor)
    workers: int | None = None  # None: the options' number
    pinned: bool = False  # worker i on CPU i (one core each, as separate devices)
    real: bool = False  # real compute whatever the options say
    measured: bool = False  # emulated with the fused segments' measured times, always


def _scenarios(o: AdaptiveBenchOptions) -> dict[str, _Scenario]:
    n = o.workers
    static = tuple(float(2 ** min(i, 2)) for i in range(n))  # 1, 2, 4, 4, ...
    return {
        "a": _Scenario("a: static 1x/2x/4x", static, ()),
        "bc": _Scenario(f"b/c: w2 1x -> {SLOW:g}x at {o.change_s:g} s, back at {o.back_s:g} s",
                        (1.0,) * n, ((o.change_s, "w2", SLOW), (o.back_s, "w2", 1.0))),
        # The case the profile gets wrong: two identical workers. Emulated with the blocks'
        # profiled times it would be balanced by construction, so he waits the fused
        # segments' measured times, and h computes for real.
        "he": _Scenario("he: 2 identical workers at rest, emulated compute: the fused "
                        "segments' measured times", (1.0, 1.0), (), workers=2, measured=True),
        "h": _Scenario("h: 2 identical workers at rest, CPUs 0|1, real compute", (1.0, 1.0),
                       (), workers=2, pinned=True, real=True),
    }


def _optimum_ips(block_ms: list[float], sizes: list[int], slowdowns: list[float],
                 scale: float) -> float:
    """Throughput of the exact optimum over the workers (the source runs no blocks)."""
    from appliance.cluster import LOOPBACK_LATENCY_MS, LOOPBACK_MBPS

    rows = [[t * scale for t in block_ms]] + [[t * scale * s for t in block_ms]
                                              for s in slowdowns]
    snap = snapshot_from_profile(rows, sizes, bandwidth_Bps=LOOPBACK_MBPS * 1e6 / 8,
                                 latency_ms=LOOPBACK_LATENCY_MS,
                                 max_blocks=[0] + [None] * len(slowdowns))
    return solve(snap).throughput_per_s


FUSED_OPEN_BYTES = 2 << 30
"""Scenario he keeps at most about this much weight memory in open sessions at once (each
boundary's two segments hold one copy of the model's weights)."""


def measure_fused_times(repository: ModelRepository, manifest: Manifest, rounds: int,
                        say: Callable[[str], None]) -> dict[tuple[int, int], float]:
    """The median time (ms) of every fused segment a 2-worker split can give, ``[0, k)`` and
    ``[k, blocks)``, with ONNX Runtime (1 thread, as a worker) on this machine.

    The segments are open together and timed in interleaved rounds, one run each per round,
    so drift over the time it takes reaches all of them alike, and each run follows another
    segment's, so it reads its weights from memory, as a worker does after receiving a frame.
    A large model is timed in groups of boundaries, at most ``FUSED_OPEN_BYTES`` of weights
    open at a time (efficientnet_lite0, 18 MB: all 48 boundaries in one group)."""
    blocks = manifest.blocks
    splits = list(range(1, blocks))
    missing = [r for k in splits for r in ((0, k), (k, blocks))
               if r[1] - r[0] > 1 and manifest.segment("ort", *r) is None]
    if missing:
        raise ArmdiError(f"scenario he times every fused segment of a 2-worker split, and "
                         f"{manifest.model_id} has {len(missing)} of them not built (e.g. "
                         f"[{missing[0][0]}, {missing[0][1]})); rebuild it with --segments all, "
                         "or leave he out (--scenarios a,bc,h)")
    weights = repository.model_dir(manifest.model_id) / manifest.weights_file
    per_split = max(1, weights.stat().st_size if weights.is_file() else 0)
    group = max(1, FUSED_OPEN_BYTES // per_split)
    rng = np.random.default_rng(0)
    medians: dict[tuple[int, int], float] = {}
    for first in range(0, len(splits), group):
        ranges = [r for k in splits[first:first + group] for r in ((0, k), (k, blocks))]
        say(f"he: timing {len(ranges)} fused segments ({len(medians) + len(ranges)} of "
            f"{2 * len(splits)}), {rounds} rounds")
        engines: dict[tuple[int, int], Engine] = {}
        try:
            for a, b in ranges:
                engines[(a, b)] = repository.open_engine(manifest, a, b, backend="ort",
                                                         threads=1)
            inputs = {(a, b): rng.standard_normal((1, *manifest.cut_points[a].shape[1:]))
                      .astype(np.float32) for a, b in ranges}
            times: dict[tuple[int, int], list[float]] = {r: [] for r in ranges}
            for r in ranges:  # a warm-up run each
                engines[r].infer(inputs[r])
            for _ in range(rounds):
                for r in ranges:
                    t0 = time.perf_counter()
                    engines[r].infer(inputs[r])
                    times[r].append((time.perf_counter() - t0) * 1000)
        finally:
            for engine in engines.values():
                engine.close()
        medians.update({r: statistics.median(v) for r, v in times.items()})
    return medians


def best_split(times: dict[tuple[int, int], float], blocks: int) -> tuple[int, float, float]:
    """Of a measured table, the 2-worker boundary with the lowest bottleneck: (boundary,
    bottleneck ms, spread = max / min - 1 of its two stages)."""
    k = min(range(1, blocks), key=lambda k: max(times[(0, k)], times[(k, blocks)]))
    left, right = times[(0, k)], times[(k, blocks)]
    return k, max(left, right), max(left, right) / min(left, right) - 1


def _run(o: AdaptiveBenchOptions, mode: str, scenario: _Scenario, block_ms: list[float],
         sizes: list[int], say: Callable[[str], None],
         times: dict[tuple[int, int], float] | None = None,
         times_file: Path | None = None) -> dict[str, Any]:
    from appliance.api import QueueFullError
    from appliance.cluster import LocalClusterOptions, running
    from appliance.data.source import Source
    from appliance.settings import source_settings

    blocks = len(block_ms)
    workers = scenario.workers or o.workers
    emulate = (o.emulate or scenario.measured) and not scenario.real
    two = (os.cpu_count() or 1) >= 2
    options = LocalClusterOptions(
        model=o.model, repo=o.repo, nodes=workers,
        mode="armdi" if mode == "armdi" else "edgepipe", slowdown=scenario.start, port=0,
        cpus=tuple((i % (os.cpu_count() or 1),) for i in range(workers))
        if scenario.pinned and two else (),
        source_runs_blocks=False, min_workers=workers, emulate_compute=emulate,
        emulate_scale=o.time_scale if emulate else 1.0, request_timeout_s=30.0,
        hysteresis=o.hysteresis, emulate_times=times_file if scenario.measured else None)
    optimum_at_rest = None
    if scenario.measured and times:  # the table's best split (transfers of ~0.1 ms aside)
        optimum_at_rest = 1000.0 / (best_split(times, blocks)[1] * o.time_scale)
    completions: list[float] = []
    latencies: list[tuple[float, float]] = []
    failed = 0
    snapshots: list[dict[str, Any]] = []
    with running(options) as (_cluster, config):
        settings = source_settings(config)
        if mode == "equal":
            settings = dataclasses.replace(settings,
                                           boundaries=(0, *even_split(blocks, workers)))
        source = Source(settings)
        try:
            source.start()
            x = np.zeros((1, *source.manifest.input.shape[1:]), np.uint8)
            pending: deque[tuple[float, Future[Any]]] = deque()
            changes = list(scenario.changes)
            slowdowns = list(scenario.start)
            t0 = time.monotonic()
            next_snapshot = 0.0
            while True:
                now = time.monotonic() - t0
                if now >= o.duration_s:
                    break
                while changes and now >= changes[0][0]:
                    _at, node, factor = changes.pop(0)
                    source.set_slowdown(node, factor)
                    slowdowns[int(node[1:]) - 1] = factor
                    say(f"{mode}: t={now:.1f} s {node} -> {factor:g}x")
                if now >= next_snapshot:
                    status = source.status()
                    snapshots.append({"t": round(now, 2), "boundaries": list(status.boundaries),
                                      "optimum_ips": optimum_at_rest or _optimum_ips(
                                          block_ms, sizes, slowdowns, options.emulate_scale),
                                      "compute_ms": {
                                          w.ref.name: w.last.compute_ms_ewma
                                          for w in source.workers
                                          if w.last is not None and w.last.processed}})
                    next_snapshot += 1.0
                while len(pending) < o.window:
                    try:
                        pending.append((time.monotonic(), source.submit(x)))
                    except QueueFullError:
                        break
                if not pending:
                    time.sleep(0.001)
                    continue
                started, future = pending.popleft()
                try:
                    future.result(timeout=60)
                    done = time.monotonic()
                    completions.append(done - t0)
                    latencies.append((done - t0, (done - started) * 1000))
                except Exception:
                    failed += 1
            for _started, future in pending:
                try:
                    future.result(timeout=60)
                except Exception:
                    failed += 1
            status = source.status()
            computes = {w.ref.name: (round(w.last.compute_ms_ewma, 3)
                                     if w.last is not None and w.last.processed else None)
                        for w in source.workers}
        finally:
            source.close()
    seconds = math.ceil(o.duration_s)
    per_s = [0] * seconds
    for t in completions:
        if t < seconds:
            per_s[int(t)] += 1
    optimum_at = [s["optimum_ips"] for s in snapshots]
    lat = sorted(ms for _t, ms in latencies)
    return {
        "mode": mode, "scenario": scenario.name, "throughput_per_s": per_s,
        "optimum_ips": optimum_at, "boundaries": [s["boundaries"] for s in snapshots],
        "p50_ms": _quantile(lat, 0.5), "p99_ms": _quantile(lat, 0.99),
        "completed": len(completions),
        "failed_requests": failed + status.failed,
        "moves": status.counters.get("boundary_moves", 0),
        "rebalances": status.counters.get("rebalances", 0),
        "move_times": _move_times(source),
        "move_log": [e.get("detail", "") for e in list(source._events)
                     if e["type"] in ("boundary_moved", "rebalanced")],
        "move_costs": _move_costs(source),
        "emulated": emulate,
        "final_boundaries": list(status.boundaries),
        "stage_ms": {v.name: (round(v.stage_ms, 3) if v.stage_ms is not None else None)
                     for v in status.nodes if v.role != "source"},
        # compute alone (the stage time above also holds the time a send waited for a busy
        # successor: in a saturated chain every stage then shows the bottleneck's cycle)
        "compute_ms": computes,
        "settled_compute_ms": _settled_compute(snapshots, o.duration_s / 2),
    }


def _move_costs(source: Any) -> dict[str, list[float]]:
    """Per boundary move: decision to the first frame run with the new range (``swap_ms``)
    and the fused engine's load time (``fused_load_ms``), as the workers report them."""
    moved = [e for e in list(source._events) if e["type"] == "boundary_moved"]
    return {"swap_ms": [float(e["swap_ms"]) for e in moved if e.get("swap_ms")],
            "fused_load_ms": [float(e["fused_load_ms"]) for e in moved
                              if e.get("fused_load_ms")]}


def _settled_compute(snapshots: list[dict[str, Any]], since_s: float) -> dict[str, float]:
    """Each worker's median compute time over the snapshots from ``since_s`` on that show the
    final boundaries (the split the run settled on)."""
    if not snapshots:
        return {}
    final = snapshots[-1]["boundaries"]
    kept = [s for s in snapshots if s["t"] >= since_s and s["boundaries"] == final]
    names = sorted({name for s in kept for name in s["compute_ms"]})
    return {name: round(statistics.median(s["compute_ms"][name] for s in kept
                                          if name in s["compute_ms"]), 3) for name in names}


def _move_times(source: Any) -> list[float]:
    events = list(source._events)
    ready = next((e["time"] for e in events if e["type"] == "ready"), None)
    return [round(e["time"] - ready, 2) for e in events
            if ready is not None and e["type"] in ("boundary_moved", "rebalanced")]


def _recovery_s(run: dict[str, Any], change_s: float, end_s: float) -> float | None:
    """From the change until a 1 s window is within 10 % of the new optimum and stays so for
    the next 2 s (None: never)."""
    tput, opt = run["throughput_per_s"], run["optimum_ips"]
    start = int(change_s)
    for s in range(start + 1, min(int(end_s), len(tput)) - 2):
        if all(tput[k] >= 0.9 * opt[min(k, len(opt) - 1)] for k in range(s, s + 3)):
            return float(s - change_s)
    return None


def run_adaptive_bench(o: AdaptiveBenchOptions,
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = progress or (lambda _m: None)
    if o.workers < 2:
        raise ArmdiError("--workers must be at least 2")
    repository = ModelRepository(o.repo)
    if not repository.has_model(o.model):
        raise ArmdiError(f"model {o.model!r} is not built in {o.repo}; build it first: "
                         f"armdi build {o.model} --repo {o.repo}")
    manifest = repository.load_manifest(o.model)
    profile = next(iter(manifest.profiles.values()), None)
    if profile is None:
        raise ArmdiError(f"{o.model} has no profile; rebuild it")
    block_ms, sizes = list(profile.block_ms), manifest.activation_bytes()
    load_start = load_avg()
    runs: dict[str, dict[str, Any]] = {}
    scenarios = _scenarios(o)
    times: dict[tuple[int, int], float] | None = None
    with tempfile.TemporaryDirectory(prefix="armdi-bench-") as tmp:
        times_file = Path(tmp) / "fused_times.json"
        if "he" in o.scenarios:
            times = measure_fused_times(repository, manifest, o.fused_rounds, say)
            times_file.write_text(json.dumps({f"{a}:{b}": ms for (a, b), ms in times.items()}))
        for key in o.scenarios:
            for mode in o.modes:
                if key in ("h", "he") and mode == "equal":
                    continue  # equal stage times is what scenarios h and he measure against
                say(f"scenario {key}, mode {mode}")
                runs[f"{key}/{mode}"] = _run(o, mode, scenarios[key], block_ms, sizes, say,
                                             times, times_file)
    summary: dict[str, Any] = {}
    half = o.duration_s / 2
    a = runs.get("a/armdi")
    if a is not None:
        tail = a["throughput_per_s"][int(half):int(o.duration_s)]
        summary["steady_ratio_to_optimum"] = round(statistics.fmean(tail) / a["optimum_ips"][-1],
                                                   3) if tail else None
        late = [t for t in a["move_times"] if t >= half]
        summary["moves_per_30s_steady"] = round(len(late) * 30 / (o.duration_s - half), 2)
        for mode in ("edgepipe", "equal"):
            other = runs.get(f"a/{mode}")
            if other is not None:
                tail = other["throughput_per_s"][int(half):int(o.duration_s)]
                summary[f"steady_ratio_to_optimum_{mode}"] = round(
                    statistics.fmean(tail) / other["optimum_ips"][-1], 3) if tail else None
    for mode in o.modes:
        b = runs.get(f"bc/{mode}")
        if b is not None:
            rec = _recovery_s(b, o.change_s, o.back_s)
            summary[f"recovery_s_{mode}" if mode != "armdi" else "recovery_s"] = rec
    for key, suffix in (("he", ""), ("h", "_real")):
        h = runs.get(f"{key}/armdi")
        if h is not None:
            summary.update({f"{name}{suffix}": value
                            for name, value in _homogeneous(h, half, o.duration_s).items()})
    if times is not None:
        k, _ms, spread = best_split(times, manifest.blocks)
        summary["homogeneous_best_boundary"] = k
        summary["homogeneous_best_spread"] = round(spread, 3)
    swaps = [v for k, r in runs.items() if k.endswith("/armdi")
             for v in r["move_costs"]["swap_ms"]]
    loads = [v for k, r in runs.items() if k.endswith("/armdi")
             for v in r["move_costs"]["fused_load_ms"]]
    if swaps:
        s_sorted = sorted(swaps)
        summary["swap_ms"] = {"moves": len(swaps), "p50": round(_quantile(s_sorted, 0.5), 2),
                              "p90": round(_quantile(s_sorted, 0.9), 2),
                              "max": round(s_sorted[-1], 2)}
    if loads:
        l_sorted = sorted(loads)
        summary["fused_load_ms"] = {"loads": len(loads),
                                    "p50": round(_quantile(l_sorted, 0.5), 2),
                                    "p90": round(_quantile(l_sorted, 0.9), 2),
                                    "max": round(l_sorted[-1], 2)}
    summary["failed_requests"] = {k: r["failed_requests"] for k, r in runs.items()}
    return {
        "model": o.model, "machine": machine_info(),
        "load_avg": {"start": load_start, "end": load_avg()},
        "settings": {k: (str(v) if isinstance(v, Path) else v)
                     for k, v in dataclasses.asdict(o).items()},
        "emulation": ("emulated compute: each node waits its segment's profiled time x "
                      f"{o.time_scale:g} x its slowdown and outputs zeros" if o.emulate else
                      "real compute (ONNX Runtime); all processes share this machine's cores")
        + ("; he waits the fused segments' measured times instead" if "he" in o.scenarios
           else "") + ("; h computes for real" if "h" in o.scenarios and o.emulate else ""),
        "runs": runs, "summary": summary,
        "fused_times_ms": ({f"{a}:{b}": ms for (a, b), ms in times.items()}
                           if times is not None else None),
    }


def _homogeneous(run: dict[str, Any], half: float, duration_s: float) -> dict[str, Any]:
    """How far a homogeneous pair's final split is from equal stage times (goal: within 5 %),
    and its moves at rest. Compute times, the links being ipc:// sockets of ~0.1 ms on either
    side; each worker's median over the second half's snapshots on the final split, as one
    reading of an average over a few frames swings by 10-20 % on 2 cores shared with the
    source."""
    out: dict[str, Any] = {}
    stages = [t for t in run["settled_compute_ms"].values() if t]
    if len(stages) < 2:  # a run too short for snapshots on its final split: the last one
        stages = [t for t in run["compute_ms"].values() if t]
    if len(stages) >= 2:
        out["homogeneous_compute_ms"] = stages
        out["homogeneous_spread"] = round(max(stages) / min(stages) - 1, 3)
        out["homogeneous_boundaries"] = run["final_boundaries"]
    late = [t for t in run["move_times"] if t >= half]
    out["moves_per_30s_rest"] = round(len(late) * 30 / (duration_s - half), 2)
    return out


def format_report(result: dict[str, Any]) -> str:
    two = " (2 in he and h)" if {"he", "h"} & set(result["settings"]["scenarios"]) else ""
    lines = [f"armdi bench adaptive: {result['model']}, {result['settings']['workers']} "
             f"workers{two}; {result['emulation']}", "",
             f"{'run':<16} {'img/s':>7} {'optimum':>8} {'p50 ms':>7} {'p99 ms':>7} "
             f"{'moves':>5} {'failed':>6}"]
    for key, run in result["runs"].items():
        tput = run["throughput_per_s"]
        lines.append(f"{key:<16} {statistics.fmean(tput):>7.1f} "
                     f"{statistics.fmean(run['optimum_ips']):>8.1f} {run['p50_ms']:>7.2f} "
                     f"{run['p99_ms']:>7.2f} {run['moves'] + run['rebalances']:>5} "
                     f"{run['failed_requests']:>6}")
    lines += ["", "summary: " + json.dumps(result["summary"])]
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: Path) -> bool:
    """Throughput over time per mode, one panel per scenario (False without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenarios = sorted({k.split("/")[0] for k in result["runs"]})
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(9, 3.2 * len(scenarios)),
                             squeeze=False)
    for ax, key in zip(axes[:, 0], scenarios, strict=True):
        for run_key, run in result["runs"].items():
            if run_key.startswith(f"{key}/"):
                ax.plot(run["throughput_per_s"], label=run["mode"])
        first = next(r for k, r in result["runs"].items() if k.startswith(f"{key}/"))
        ax.plot(first["optimum_ips"], "k--", linewidth=1, label="exact optimum")
        emulated = first.get("emulated", result["emulation"].startswith("emulated"))
        kind = "" if "compute" in first["scenario"] else (
            " (emulated compute)" if emulated else " (real compute)")
        ax.set_title(first["scenario"] + kind)
        ax.set_xlabel("s")
        ax.set_ylabel("img/s")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
