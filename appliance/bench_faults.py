"""``armdi bench faults``: a 4-worker local cluster under steady load, one run per fault.

Faults: kill -9 of a middle worker, kill -9 of the last worker, a worker paused for 3 s,
two workers killed one second apart, and a killed worker restarted by the supervisor (the
supervisor is off in every other run, so recovery is measured without it). Each fault runs
in mode ``armdi`` (failure detection, re-routing, replay) and, for contrast, ``edgepipe``
(the static baseline, which only re-sends).

For each run: requests sent and results returned, lost (failed), duplicated (a request
answered twice) and wrong (against ONNX Runtime on the full model), the time from the fault
to the next completed request, and until a 1 s window's throughput is back within 10 % of
the exact optimum over the survivors at their measured speeds. Real compute by default: every
worker really runs its blocks (all processes share this machine's cores, so four workers
cannot all compute at once on two, and the optimum at their measured speeds is out of
reach); ``--emulate`` waits each segment's profiled time instead, so the workers do run in
parallel and the optimum can be reached (answers are then zeros: ``wrong`` is not checked).
A benchmark, not a test.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.bench import load_avg, machine_info
from engines.errors import ArmdiError
from engines.preprocess import Normaliser
from engines.repository import ModelRepository

FAULTS: dict[str, tuple[tuple[float, str, str], ...]] = {
    "kill_middle": ((0.0, "kill", "w2"),),
    "kill_last": ((0.0, "kill", "w4"),),
    "pause_3s": ((0.0, "pause", "w2"),),
    "kill_two": ((0.0, "kill", "w2"), (1.0, "kill", "w3")),
    "kill_restart": ((0.0, "kill", "w2"),),
}


@dataclass(frozen=True)
class FaultBenchOptions:
    repo: Path
    model: str = "efficientnet_lite0"
    duration_s: float = 14.0
    fault_s: float = 4.0
    window: int = 4
    modes: tuple[str, ...] = ("armdi", "edgepipe")
    faults: tuple[str, ...] = tuple(FAULTS)
    emulate: bool = False  # emulated compute: nodes wait their blocks' profiled time
    time_scale: float = 4.0  # ... times this


def _run(o: FaultBenchOptions, mode: str, fault: str, pixels: np.ndarray,
         reference: np.ndarray, say: Callable[[str], None]) -> dict[str, Any]:
    from appliance.api import QueueFullError
    from appliance.cluster import LocalClusterOptions, running
    from appliance.data.source import Source
    from appliance.settings import source_settings

    options = LocalClusterOptions(model=o.model, repo=o.repo, nodes=4, mode=mode, port=0,
                                  source_runs_blocks=False, min_workers=4,
                                  supervise=fault == "kill_restart", request_timeout_s=10.0,
                                  emulate_compute=o.emulate,
                                  emulate_scale=o.time_scale if o.emulate else 1.0)
    sent = returned = lost = wrong = 0
    seen: set[int] = set()
    duplicated = 0
    done_at: list[float] = []
    optimum_ips: list[float] = []
    with running(options) as (_cluster, config):
        source = Source(source_settings(config))
        try:
            source.start()
            pending: deque[Future[Any]] = deque()
            steps = list(FAULTS[fault])
            t0 = time.monotonic()
            next_sample = 0.0
            while (now := time.monotonic() - t0) < o.duration_s:
                while steps and now >= o.fault_s + steps[0][0]:
                    _at, action, node = steps.pop(0)
                    seconds = 3.0
                    say(f"{mode}/{fault}: t={now:.1f} s {source.fault(node, action, seconds)}")
                if now >= next_sample:
                    status = source.status()
                    optimum_ips.append(1000.0 / status.optimum_bottleneck_ms
                                       if status.optimum_bottleneck_ms else math.nan)
                    next_sample += 1.0
                while len(pending) < o.window:
                    try:
                        pending.append(source.submit(pixels))
                        sent += 1
                    except QueueFullError:
                        break
                if not pending:
                    time.sleep(0.005)
                    continue
                future = pending.popleft()
                try:
                    result = future.result(timeout=30)
                except Exception:
                    lost += 1
                    continue
                returned += 1
                done_at.append(time.monotonic() - t0)
                if result.request_id in seen:
                    duplicated += 1
                seen.add(result.request_id)
                if not o.emulate and float(np.max(np.abs(result.output - reference))) > 1e-3:
                    wrong += 1  # (emulated compute answers zeros: nothing to check)
            for future in pending:
                try:
                    future.result(timeout=30)
                    returned += 1
                except Exception:
                    lost += 1
            counters = source.status().counters
        finally:
            source.close()
    after = [t for t in done_at if t > o.fault_s]
    window = [o.fault_s, *(t for t in after if t <= o.fault_s + 5.0)]
    stall = max((b - a for a, b in itertools.pairwise(window)), default=None)
    per_s = [0] * math.ceil(o.duration_s)
    for t in done_at:
        per_s[min(int(t), len(per_s) - 1)] += 1
    recovered = None
    for s in range(int(o.fault_s) + 1, len(per_s) - 1):
        target = optimum_ips[min(s, len(optimum_ips) - 1)]
        if math.isfinite(target) and all(per_s[k] >= 0.9 * target for k in (s, s + 1)):
            recovered = float(s - o.fault_s)
            break
    return {"mode": mode, "fault": fault, "sent": sent, "returned": returned, "lost": lost,
            "duplicated": duplicated, "wrong": None if o.emulate else wrong,
            "time_to_next_completion_s": round(after[0] - o.fault_s, 3) if after else None,
            # the longest wait between two completions in the 5 s after the fault: the stall
            "longest_stall_s": round(stall, 3) if stall is not None else None,
            "time_to_recovered_s": recovered, "throughput_per_s": per_s,
            "optimum_ips": [round(x, 1) for x in optimum_ips],
            "duplicates_dropped": counters.get("duplicate_results", 0),
            "reroutes": counters.get("reroutes", 0), "rejoins": counters.get("rejoins", 0)}


def run_fault_bench(o: FaultBenchOptions,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    import onnxruntime as ort

    say = progress or (lambda _m: None)
    repository = ModelRepository(o.repo)
    if not repository.has_model(o.model):
        raise ArmdiError(f"model {o.model!r} is not built in {o.repo}; build it first: "
                         f"armdi build {o.model} --repo {o.repo}")
    manifest = repository.load_manifest(o.model)
    pixels = np.random.default_rng(0).integers(0, 256, (1, *manifest.input.shape[1:]),
                                               dtype=np.uint8)
    session = ort.InferenceSession(str(repository.model_dir(o.model) / manifest.full_model),
                                   providers=["CPUExecutionProvider"])
    x = Normaliser(manifest.preprocessing)(pixels)
    reference = session.run(None, {session.get_inputs()[0].name: x})[0]
    load_start = load_avg()
    runs = []
    for fault in o.faults:
        for mode in o.modes:
            say(f"{mode}: {fault}")
            runs.append(_run(o, mode, fault, pixels, reference, say))
    armdi = [r for r in runs if r["mode"] == "armdi"]
    nexts = [r["time_to_next_completion_s"] for r in armdi
             if r["time_to_next_completion_s"] is not None]
    stalls = [r["longest_stall_s"] for r in armdi if r["longest_stall_s"] is not None]
    recs = [r["time_to_recovered_s"] for r in armdi]
    summary = {
        "lost": sum(r["lost"] for r in armdi), "duplicated": sum(r["duplicated"] for r in armdi),
        "wrong": None if o.emulate else sum(r["wrong"] for r in armdi),
        "max_time_to_next_completion_s": max(nexts) if nexts else None,
        "max_stall_s": max(stalls) if stalls else None,
        "max_time_to_recovered_s": (None if any(r is None for r in recs) or not recs
                                    else max(recs)),
        "edgepipe_lost": sum(r["lost"] for r in runs if r["mode"] == "edgepipe"),
    }
    return {"model": o.model, "machine": machine_info(),
            "load_avg": {"start": load_start, "end": load_avg()},
            "settings": {"duration_s": o.duration_s, "fault_s": o.fault_s,
                         "window": o.window, "workers": 4,
                         "compute": (f"emulated: each node waits its blocks' profiled time x "
                                     f"{o.time_scale:g} and answers zeros (wrong: not "
                                     "checked)") if o.emulate else "real (ONNX Runtime)"},
            "runs": runs, "summary": summary}


def format_report(result: dict[str, Any]) -> str:
    lines = [f"armdi bench faults: {result['model']}, 4 workers, "
             f"{result['settings']['compute']}", "",
             f"{'mode/fault':<24} {'sent':>5} {'ret':>5} {'lost':>5} {'dup':>4} {'wrong':>5} "
             f"{'next s':>7} {'stall s':>7} {'recov s':>7}"]
    for r in result["runs"]:
        nxt = r["time_to_next_completion_s"]
        rec = r["time_to_recovered_s"]
        stall = r["longest_stall_s"]
        lines.append(f"{r['mode'] + '/' + r['fault']:<24} {r['sent']:>5} {r['returned']:>5} "
                     f"{r['lost']:>5} {r['duplicated']:>4} "
                     f"{'-' if r['wrong'] is None else r['wrong']:>5} "
                     f"{'-' if nxt is None else f'{nxt:.2f}':>7} "
                     f"{'-' if stall is None else f'{stall:.2f}':>7} "
                     f"{'-' if rec is None else f'{rec:.0f}':>7}")
    lines += ["", f"summary (armdi runs): {result['summary']}"]
    return "\n".join(lines)
