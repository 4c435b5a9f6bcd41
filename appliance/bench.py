"""``armdi bench pipeline``: what the runtime costs on this machine, measured side by side.

One run, one process start, the same input for everything:

1. **direct**: ONNX Runtime on the full model (``model.onnx``), one session, one thread,
   sequential batch-1 requests: throughput and p50/p99 latency, the baseline.
2. **pipeline_1node**: the source (it runs no blocks) and one worker process running the whole
   model, edgepipe mode. Latency with one request in flight at a time, throughput with
   ``window`` requests kept in flight. ``overhead_1node = p50(pipeline_1node) / p50(direct)``.
3. **pipeline_1node_pinned** and **pipeline_2node**: one worker pinned to CPU 0, against two
   workers pinned to CPUs 0 and 1 (the allocator picks the boundary from the manifest's
   profile). ``speedup_2node = throughput(2 workers) / throughput(1 worker pinned)``. Pinning
   emulates one device per core; the source process is not pinned and shares both cores.
4. **transfer**: the activation at the 2-worker boundary sent between two processes over
   ``ipc://`` (pinned to CPUs 0 and 1, like the hop): raw pynng (``nng_send`` of the array,
   ``nng_recvmsg`` with no copy) against the pipeline's hop (``Frame`` + ``frame_parts`` +
   ``DataOutbox.send_frame``, ``DataInbox.recv`` + ``decode_frame``), each timed one way, one
   message at a time. ``hop_cost_ratio = frame_ms / raw_ms``. The same for the input tensor
   (the source's hop) is reported as ``transfer_input``.

5. **security** (``--security``, or alone with ``--security-only``): the 2-worker pipeline over
   loopback TCP with every combination of mutual TLS (``tls+tcp://``, keys from ``armdi keys
   init``) and HMAC-SHA256 tags on frames and control messages, side by side:
   ``tls_throughput_ratio = throughput(TLS) / throughput(plain TCP)`` and
   ``hmac_throughput_ratio = throughput(HMAC) / throughput(none)``, with the latencies.

The configurations are measured in turn, in a rotating order, ``repeats`` times, each
pipeline on a cluster of its own started for the repetition (and warmed up) and stopped after
it, so only one runs at a time, as deployed; each figure is the median over the repetitions.
Benchmarks are not tests: this asserts nothing, it reports. Nothing here imports torch or the
builder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.netlinks import LinkSpec
from appliance.wire.frames import CODEC
from engines.errors import ArmdiError, ModelNotFoundError
from engines.manifest import Manifest
from engines.preprocess import Normaliser
from engines.repository import ModelRepository

GOALS: dict[str, tuple[str, float]] = {
    "overhead_1node": ("<=", 1.10),
    "hop_cost_ratio": ("<=", 1.25),
    "speedup_2node": (">=", 1.75),
    "cpu_ratio": ("<=", 1.10),
}

Progress = Callable[[str], None]

BENCH_KEY_HEX = "a5" * 32  # the HMAC key of the security section's clusters (a benchmark's)

TRANSFER_BLOCK = 25
"""Messages of one kind sent in a row before the transfer benchmark switches kind."""


@dataclass(frozen=True)
class PipelineBenchOptions:
    repo: Path
    model: str = "efficientnet_lite0"
    requests: int = 200
    """Requests per measurement (latency mode and throughput mode each)."""
    repeats: int = 3
    """Repetitions of every measurement; figures are the median over them."""
    warmup: int = 20
    """Requests run and discarded before the first repetition of each configuration."""
    window: int = 8
    """Requests kept in flight in throughput mode."""
    transfer_messages: int = 300
    """Messages per transfer measurement and repetition."""
    request_timeout_s: float = 30.0
    security: bool = False
    """Also measure TLS against plain TCP and HMAC against none (section 5)."""
    security_only: bool = False
    """Measure section 5 alone (the other figures are left out of the result)."""
    link: LinkSpec | None = None
    """Every pipeline's links at this rate (and delay): tc-shaped where root, else emulated
    by the transport (``appliance.netlinks``); None: loopback as it is."""
    link_shaping: str = "auto"
    """auto | tc | transport (see ``LocalClusterOptions.link_shaping``)."""


@dataclass(frozen=True)
class _PipelineSpec:
    key: str
    label: str
    cpus: tuple[tuple[int, ...] | None, ...]
    boundaries: tuple[int, ...] | None = None  # None: the allocator's optimum
    transport: str = "ipc"  # ipc | tcp | tls (appliance.cluster)
    hmac: bool = False  # frames and control messages tagged under a cluster key


# ---------------------------------------------------------------------------- helpers
def _quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (linear interpolation between closest ranks)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def _round(value: float, digits: int = 4) -> float:
    return round(value, digits) if math.isfinite(value) else value


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort
    import pynng

    return {
        "cpu_count": os.cpu_count() or 1,
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "pynng": getattr(pynng, "__version__", "?"),
        "frame_decoder": CODEC,  # "c" where appliance/wire/_codec.c was built, else "python"
    }


def load_avg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux/macOS
        return []


def _proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc``), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (int(fields[11]) + int(fields[12])) / ticks


def _ensure_model(repository: ModelRepository, model: str) -> Manifest:
    if not repository.has_model(model):
        raise ModelNotFoundError(
            f"model {model!r} is not built in {repository.root}; build it first: "
            f"armdi build {model} --repo {repository.root} --segments all")
    manifest = repository.load_manifest(model)
    repository.check_file(manifest, manifest.weights_file)
    repository.check_file(manifest, manifest.full_model)
    return manifest


# ---------------------------------------------------------------------------- direct ORT
class _Direct:
    """The full model in one ONNX Runtime session, one thread."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        from engines.ort import session_options

        self.session = ort.InferenceSession(str(path), sess_options=session_options(threads=1),
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> None:
        self.session.run(None, {self.input_name: x})

    def measure(self, x: np.ndarray, n: int) -> dict[str, Any]:
        lat: list[float] = []
        cpu0 = time.process_time()
        start = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            self.run(x)
            lat.append((time.perf_counter() - t0) * 1000)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu0
        return {"throughput_ips": n / elapsed, "p50_ms": _quantile(lat, 0.5),
                "p99_ms": _quantile(lat, 0.99), "mean_ms": statistics.fmean(lat),
                "cpu_ms_per_request": cpu * 1000 / n}


# ---------------------------------------------------------------------------- pipelines
class _Pipeline:
    """A local cluster (worker processes) and an in-process source that runs no blocks."""

    def __init__(self, spec: _PipelineSpec, source: Any, worker_pids: list[int],
                 link_note: str = "links: not shaped") -> None:
        self.spec = spec
        self.source = source
        self.worker_pids = worker_pids
        self.link_note = link_note

    def latency(self, x: np.ndarray, n: int,
                timeout_s: float) -> tuple[list[float], list[float]]:
        """``n`` requests, one in flight at a time: client-side latency in ms, and the
        workers' compute time (their trace entries) of each."""
        lat, compute = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            result = self.source.submit(x).result(timeout=timeout_s)
            lat.append((time.perf_counter() - t0) * 1000)
            compute.append(sum(hop.ms for hop in result.path))
        return lat, compute

    def throughput(self, x: np.ndarray, n: int, window: int,
                   timeout_s: float) -> dict[str, Any]:
        """``n`` requests with ``window`` of them in flight; also the CPU each process used."""
        inflight: deque[Future[Any]] = deque()
        cpu0 = time.process_time()
        workers0 = [_proc_cpu_s(pid) for pid in self.worker_pids]
        start = time.perf_counter()
        for _ in range(n):
            if len(inflight) >= window:
                inflight.popleft().result(timeout=timeout_s)
            inflight.append(self.source.submit(x))
        for future in inflight:
            future.result(timeout=timeout_s)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu0
        workers1 = [_proc_cpu_s(pid) for pid in self.worker_pids]
        util = {
            name: (round((b - a) / elapsed, 3) if a is not None and b is not None else None)
            for name, a, b in zip(self._worker_names(), workers0, workers1, strict=True)
        }
        worker_cpu = sum(b - a for a, b in zip(workers0, workers1, strict=True)
                         if a is not None and b is not None)
        return {"throughput_ips": n / elapsed,
                "cpu_ms_per_request": (cpu + worker_cpu) * 1000 / n,
                "source_cpu_ms_per_request": cpu * 1000 / n,
                "source_cpu_util": round(cpu / elapsed, 3),
                "worker_cpu_util": util}

    def _worker_names(self) -> list[str]:
        return [w.ref.name for w in self.source.workers]

    def measure(self, x: np.ndarray, n: int, window: int, timeout_s: float) -> dict[str, Any]:
        lat, compute = self.latency(x, n, timeout_s)
        out = self.throughput(x, n, window, timeout_s)
        out.update(p50_ms=_quantile(lat, 0.5), p99_ms=_quantile(lat, 0.99),
                   mean_ms=statistics.fmean(lat), compute_p50_ms=_quantile(compute, 0.5),
                   overhead_p50_ms=_quantile([a - b for a, b in zip(lat, compute,
                                                                     strict=True)], 0.5))
        return out

    def layout(self) -> dict[str, Any]:
        """Boundaries, each node's segment and CPUs, the allocator's and measured stage times."""
        source = self.source
        alloc = source.allocation
        status = source.status()
        cpus = dict(zip(self._worker_names(), self.spec.cpus, strict=False))
        nodes = []
        for view in status.nodes:
            if view.end <= view.start and view.role == "source":
                continue
            nodes.append({"node": view.name, "blocks": [view.start, view.end],
                          "cpus": list(cpus.get(view.name) or []) or None,
                          "measured_stage_ms": _round(view.stage_ms)
                          if view.stage_ms is not None else None})
        return {"boundaries": list(alloc.boundaries) if alloc else [],
                "predicted_stage_ms": [_round(t) for t in alloc.stage_ms] if alloc else [],
                "nodes": nodes}


@contextlib.contextmanager
def _pipeline(spec: _PipelineSpec, options: PipelineBenchOptions) -> Iterator[_Pipeline]:
    from appliance.cluster import LocalClusterOptions, running
    from appliance.data.source import Source
    from appliance.settings import source_settings

    cluster_options = LocalClusterOptions(
        model=options.model, repo=options.repo, nodes=len(spec.cpus), mode="edgepipe",
        cpus=spec.cpus, port=0, source_runs_blocks=False, min_workers=len(spec.cpus),
        request_timeout_s=options.request_timeout_s, transport=spec.transport,
        key_hex=BENCH_KEY_HEX if spec.hmac else None, link=options.link,
        link_shaping=options.link_shaping)
    with running(cluster_options) as (cluster, config):
        settings = dataclasses.replace(source_settings(config), boundaries=spec.boundaries)
        source = Source(settings)
        try:
            source.start()
            yield _Pipeline(spec, source, [p.pid for p in cluster.procs], cluster.link_note)
        finally:
            source.close()


def _two_cpus() -> tuple[tuple[int, ...], tuple[int, ...]]:
    return ((0,), (1,) if (os.cpu_count() or 1) >= 2 else (0,))


def _pipeline_specs(balanced: int | None, blocks: int) -> list[_PipelineSpec]:
    two = (os.cpu_count() or 1) >= 2
    label = "2 workers, CPUs 0|1" if two else "2 workers, CPU 0"
    specs = [
        _PipelineSpec("pipeline_1node", "1 worker (not pinned)", (None,)),
        _PipelineSpec("pipeline_1node_pinned", "1 worker, CPU 0", ((0,),)),
        _PipelineSpec("pipeline_2node", f"{label}, static boundary", _two_cpus()),
    ]
    if balanced is not None:
        specs.append(_PipelineSpec("pipeline_2node_balanced", f"{label}, balanced boundary",
                                   _two_cpus(), (0, 0, balanced, blocks)))
    return specs


def _security_specs() -> list[_PipelineSpec]:
    two = _two_cpus()
    return [_PipelineSpec(f"security_{name}", label, two, transport=transport, hmac=hmac)
            for name, label, transport, hmac in (
                ("plain", "tcp://, no HMAC", "tcp", False),
                ("hmac", "tcp://, HMAC", "tcp", True),
                ("tls", "tls+tcp://, no HMAC", "tls", False),
                ("tls_hmac", "tls+tcp://, HMAC", "tls", True))]


def run_security_bench(options: PipelineBenchOptions, pixels: np.ndarray,
                       say: Progress) -> dict[str, Any]:
    """Section 5: the same 2-worker pipeline with and without TLS and HMAC, in rotation."""
    specs = _security_specs()
    reps: dict[str, list[dict[str, Any]]] = {spec.key: [] for spec in specs}
    timeout = options.request_timeout_s
    for rep in range(options.repeats):
        order = specs[rep % len(specs):] + specs[:rep % len(specs)]
        for spec in order:
            say(f"security {rep + 1}/{options.repeats}: {spec.label}")
            with _pipeline(spec, options) as pipe:
                pipe.latency(pixels, options.warmup, timeout)
                pipe.throughput(pixels, options.warmup, options.window, timeout)
                reps[spec.key].append(pipe.measure(pixels, options.requests, options.window,
                                                   timeout))
    out: dict[str, Any] = {spec.key: {"label": spec.label, "transport": spec.transport,
                                      "hmac": spec.hmac, **_summarise(reps[spec.key])}
                           for spec in specs}

    def ratio(a: str, b: str, key: str = "throughput_ips") -> float:
        return _round(out[f"security_{a}"][key] / out[f"security_{b}"][key], 3)

    out["ratios"] = {
        "tls_throughput_ratio": ratio("tls", "plain"),
        "tls_p50_ratio": ratio("tls", "plain", "p50_ms"),
        "hmac_throughput_ratio": ratio("hmac", "plain"),
        "hmac_p50_ratio": ratio("hmac", "plain", "p50_ms"),
        "tls_hmac_throughput_ratio": ratio("tls_hmac", "plain"),
        "tls_hmac_p50_ratio": ratio("tls_hmac", "plain", "p50_ms"),
    }
    return out


def format_security(section: dict[str, Any]) -> list[str]:
    lines = ["", "security: 2 workers (CPUs 0|1), static boundary, loopback TCP",
             f"{'configuration':<38} {'img/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'overhead':>8}"]
    for key in ("security_plain", "security_hmac", "security_tls", "security_tls_hmac"):
        r = section[key]
        lines.append(f"{r['label']:<38} {r['throughput_ips']:>7.1f} {r['p50_ms']:>7.2f} "
                     f"{r['p99_ms']:>7.2f} {r.get('overhead_p50_ms', math.nan):>8.2f}")
    ratios = section["ratios"]
    lines.append("against plain tcp://: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    return lines


# ---------------------------------------------------------------------------- balance
def find_balanced_boundary(options: PipelineBenchOptions, blocks: int, x: np.ndarray,
                           say: Progress) -> dict[str, Any]:
    """The 2-worker boundary with the highest measured throughput, on one cluster.

    The profile times blocks one by one, which misjudges fused segments, so the static
    boundary is off balance. Bisect on the workers' measured compute times (from the frames'
    traces) for where the first worker's stage overtakes the second's, then measure the
    throughput at that crossing, its neighbours and the static boundary, and keep the best.
    """
    spec = _PipelineSpec("balance", "2 workers", _two_cpus())
    probes: list[dict[str, Any]] = []
    timeout = options.request_timeout_s
    with _pipeline(spec, options) as pipe:
        assert pipe.source.allocation is not None
        static = pipe.source.allocation.boundaries[2]

        def stages(b: int) -> tuple[float, float]:
            pipe.source.set_boundaries((0, 0, b, blocks))
            pipe.latency(x, 5, timeout)
            per_hop: list[list[float]] = [[], []]
            for _ in range(max(10, options.requests // 10)):
                result = pipe.source.submit(x).result(timeout=timeout)
                for i, hop in enumerate(result.path[:2]):
                    per_hop[i].append(hop.ms)
            first, second = (_median(v) for v in per_hop)
            probes.append({"boundary": b, "stage_ms": [_round(first), _round(second)]})
            say(f"balance: boundary {b}: {first:.3f} | {second:.3f} ms")
            return first, second

        lo, hi = 1, blocks - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            first, second = stages(mid)
            lo, hi = (mid, hi) if first < second else (lo, mid)
        candidates = sorted({b for b in (lo - 1, lo, hi, hi + 1, static) if 0 < b < blocks})
        throughputs = {}
        for b in candidates:
            pipe.source.set_boundaries((0, 0, b, blocks))
            pipe.throughput(x, options.warmup, options.window, timeout)
            throughputs[b] = pipe.throughput(x, options.requests, options.window,
                                             timeout)["throughput_ips"]
            say(f"balance: boundary {b}: {throughputs[b]:.1f} img/s")
    best = max(throughputs, key=lambda b: throughputs[b])
    return {"static": static, "balanced": best, "bisection": probes,
            "throughput_ips": {str(b): _round(v, 2) for b, v in throughputs.items()}}


# ---------------------------------------------------------------------------- transfer
def measure_transfer(shape: Sequence[int], messages: int, repeats: int, *,
                     cpus: tuple[int | None, int | None] = (None, None),
                     warmup: int = 30, timeout_s: float = 120.0) -> dict[str, Any]:
    """One-way cost of shipping a float32 tensor of ``shape`` between two processes.

    Both ends are fresh processes (``python -m appliance.bench``); the sender stamps each
    message with ``time.perf_counter_ns()`` (CLOCK_MONOTONIC, shared by the processes), the
    receiver answers with the elapsed time once it holds the decoded message, and the sender
    waits for that answer before the next message, so nothing queues. The two kinds alternate
    in blocks of ``TRANSFER_BLOCK`` messages, so both see the same machine; each repetition
    gives a median per kind, and the figures are the medians over the repetitions.
    """
    modes = ("raw", "frame")
    schedule = []
    for r in range(repeats):
        done = 0
        while done < messages:
            count = min(TRANSFER_BLOCK, messages - done)
            order = modes if (r + done // TRANSFER_BLOCK) % 2 == 0 else modes[::-1]
            schedule += [[mode, warmup if r == done == 0 else 2, count, r] for mode in order]
            done += count
    with tempfile.TemporaryDirectory(prefix="armdi-xfer-") as tmp:
        spec = {"shape": list(shape), "schedule": schedule,
                "raw": f"ipc://{tmp}/raw", "frame": f"ipc://{tmp}/frame",
                "ack": f"ipc://{tmp}/ack", "timeout_ms": int(timeout_s * 1000)}
        procs = []
        try:
            for role, cpu in (("recv", cpus[1]), ("send", cpus[0])):
                arg = json.dumps({**spec, "cpu": cpu})
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "appliance.bench", f"transfer-{role}", arg],
                    stdin=subprocess.DEVNULL, text=True,
                    stdout=subprocess.PIPE if role == "send" else subprocess.DEVNULL))
            out, _ = procs[1].communicate(timeout=timeout_s)
            procs[0].wait(timeout=10)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
        if procs[1].returncode != 0:
            raise ArmdiError(f"the transfer benchmark's sender failed (status "
                             f"{procs[1].returncode}); see its error above")
    rounds: dict[str, list[float]] = {m: [] for m in modes}
    for entry in sorted(json.loads(out.strip().splitlines()[-1]), key=lambda e: e["round"]):
        rounds[entry["mode"]].append(entry["p50_ms"])
    nbytes = int(np.prod(shape)) * 4
    return {"bytes": nbytes, "shape": list(shape), "messages": messages,
            "raw_ms": _median(rounds["raw"]), "frame_ms": _median(rounds["frame"]),
            "rounds": {m: [_round(v) for v in vals] for m, vals in rounds.items()},
            "cpus": list(cpus)}


def _transfer_child(role: str, spec: dict[str, Any]) -> None:
    import pynng
    from pynng import ffi, lib

    from appliance.wire import frames as fr
    from appliance.wire.transport import DataInbox, DataOutbox

    if spec["cpu"] is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {spec["cpu"]})
    timeout = int(spec["timeout_ms"])
    stamp = struct.Struct("<q")
    if role == "recv":
        raw_in = pynng.Pull0(listen=spec["raw"], recv_timeout=timeout)
        inbox = DataInbox(spec["frame"], max_bytes=1 << 30)
        ack = pynng.Push0(send_timeout=timeout)
        ack.dial(spec["ack"], block=False)
        msg_p = ffi.new("nng_msg **")
        try:
            for mode, warm, count, _round_no in spec["schedule"]:
                for _ in range(warm + count):
                    if mode == "raw":
                        pynng.check_err(lib.nng_recvmsg(raw_in.socket, msg_p, 0))
                        body = ffi.buffer(lib.nng_msg_body(msg_p[0]), 8)
                        (t0,) = stamp.unpack(body)
                        t1 = time.perf_counter_ns()
                        lib.nng_msg_free(msg_p[0])
                    else:
                        frame = fr.decode_frame(inbox.recv(timeout_ms=timeout), key=None,
                                                max_bytes=1 << 30)
                        t1 = time.perf_counter_ns()
                        (t0,) = stamp.unpack_from(frame.tensor.reshape(-1).view(np.uint8).data)
                        del frame
                    ack.send(stamp.pack(t1 - t0))
        finally:
            raw_in.close()
            inbox.close()
            ack.close()
        return
    raw_out = pynng.Push0(send_timeout=timeout)
    raw_out.dial(spec["raw"], block=False)
    outbox = DataOutbox(spec["frame"])
    ack_in = pynng.Pull0(listen=spec["ack"], recv_timeout=timeout)
    shape = tuple(spec["shape"])
    tensor = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    head = tensor.reshape(-1).view(np.uint8)[:8]
    # What a worker does per hop: the frame it received, forwarded with its own trace entry.
    received = fr.Frame(kind=fr.FrameKind.ACTIVATION, request_id=1, attempt=1,
                        fingerprint=bytes(32), start_block=0, tensor=tensor,
                        trace=(fr.TraceEntry(node="w0", start=0, end=0, ms=0.0),))
    prefix = fr.node_prefix("w1")
    times: dict[tuple[int, str], list[float]] = {}
    try:
        for mode, warm, count, rnd in spec["schedule"]:
            kept = times.setdefault((rnd, mode), [])
            for i in range(warm + count):
                t0 = time.perf_counter_ns()
                head[:] = np.frombuffer(stamp.pack(t0), np.uint8)
                if mode == "raw":
                    data = ffi.from_buffer(tensor)
                    pynng.check_err(lib.nng_send(raw_out.socket, data, len(data), 0))
                else:
                    frame = received.forward(fr.FrameKind.ACTIVATION, 1, tensor,
                                             fr.hop_wire(prefix, 0, 1, 1.0))
                    outbox.send_frame(fr.frame_parts(frame, None), timeout_ms=timeout)
                (dt,) = stamp.unpack(ack_in.recv())
                if i >= warm:
                    kept.append(dt / 1e6)
    finally:
        raw_out.close()
        outbox.close()
        ack_in.close()
    results = [{"round": rnd, "mode": mode, "p50_ms": _quantile(values, 0.5),
                "mean_ms": statistics.fmean(values)} for (rnd, mode), values in times.items()]
    print(json.dumps(results), flush=True)


# ---------------------------------------------------------------------------- the benchmark
def _summarise(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repetitions of every numeric figure; the repetitions kept alongside."""
    out: dict[str, Any] = {}
    for key in ("throughput_ips", "p50_ms", "p99_ms", "mean_ms", "compute_p50_ms",
                "overhead_p50_ms", "cpu_ms_per_request", "source_cpu_ms_per_request",
                "source_cpu_util"):
        values = [r[key] for r in reps if key in r]
        if values:
            out[key] = _round(_median(values))
    utils = [r["worker_cpu_util"] for r in reps if "worker_cpu_util" in r]
    if utils:
        out["worker_cpu_util"] = {
            name: (_round(_median([u[name] for u in utils if u[name] is not None]), 3)
                   if any(u[name] is not None for u in utils) else None)
            for name in utils[0]}
    out["repetitions"] = [{k: (_round(v) if isinstance(v, float) else v) for k, v in r.items()}
                          for r in reps]
    return out


def _goals(ratios: dict[str, float]) -> tuple[dict[str, str], dict[str, bool]]:
    goals = {k: f"{op} {v:g}" for k, (op, v) in GOALS.items()}
    met = {}
    for key, (op, target) in GOALS.items():
        value = ratios[key]
        met[key] = bool(math.isfinite(value) and (value >= target if op == ">=" else
                                                  value <= target))
    return goals, met


def run_pipeline_bench(options: PipelineBenchOptions,
                       progress: Progress | None = None) -> dict[str, Any]:
    """Run every measurement and return the JSON-ready result (see the module docstring)."""
    say = progress or (lambda _msg: None)
    if options.requests < 1 or options.repeats < 1 or options.window < 1:
        raise ArmdiError("--requests, --repeats and --window must be at least 1")
    repository = ModelRepository(options.repo)
    manifest = _ensure_model(repository, options.model)
    load_start = load_avg()
    # An image request, as /v1/classify makes it: the pipeline ships uint8 pixels and the
    # first worker normalises them (that counts as overhead); ORT alone gets float32.
    pixels = np.random.default_rng(0).integers(0, 256, (1, *manifest.input.shape[1:]),
                                               dtype=np.uint8)
    if options.security_only:
        security = run_security_bench(options, pixels, say)
        return {"model": options.model, "machine": machine_info(),
                "load_avg": {"start": load_start, "end": load_avg()},
                "settings": {"requests": options.requests, "repeats": options.repeats,
                             "warmup": options.warmup, "window": options.window},
                "security": security}
    x = Normaliser(manifest.preprocessing)(pixels)
    timeout = options.request_timeout_s
    direct = _Direct(repository.model_dir(options.model) / manifest.full_model)
    reps: dict[str, list[dict[str, Any]]] = {"direct": []}
    layouts: dict[str, dict[str, Any]] = {}
    balance = None
    if manifest.blocks >= 2:
        say("finding the balanced 2-worker boundary")
        balance = find_balanced_boundary(options, manifest.blocks, pixels, say)
    specs = _pipeline_specs(balance["balanced"] if balance else None, manifest.blocks)
    for key in (spec.key for spec in specs):
        reps[key] = []
    say("warming up")
    for _ in range(options.warmup):
        direct.run(x)
    keys = ["direct", *(spec.key for spec in specs)]
    by_key = {spec.key: spec for spec in specs}
    link_note = "links: not shaped"
    for rep in range(options.repeats):
        order = keys[rep % len(keys):] + keys[:rep % len(keys)]
        for key in order:
            say(f"repetition {rep + 1}/{options.repeats}: {key}")
            if key == "direct":
                reps[key].append(direct.measure(x, options.requests))
                continue
            # One cluster at a time, as deployed: idle clusters would only add noise.
            with _pipeline(by_key[key], options) as pipe:
                link_note = pipe.link_note
                pipe.latency(pixels, options.warmup, timeout)
                pipe.throughput(pixels, options.warmup, options.window, timeout)
                reps[key].append(pipe.measure(pixels, options.requests, options.window,
                                              timeout))
                if rep == options.repeats - 1:
                    time.sleep(1.2)  # let the source poll the workers' stage times once more
                    layouts[key] = pipe.layout()
    boundaries = layouts["pipeline_2node"]["boundaries"]
    inner = [b for b in boundaries[1:-1] if 0 < b < manifest.blocks]
    cut = manifest.cut_points[inner[0] if inner else 0]
    two = (os.cpu_count() or 1) >= 2
    say(f"transfer: {cut.bytes_per_sample} bytes (cut point {cut.index}) between two processes")
    transfer = measure_transfer((1, *cut.shape[1:]), options.transfer_messages, options.repeats,
                                cpus=(0, 1) if two else (None, None))
    transfer["cut_point"] = cut.index
    source_cut = manifest.cut_points[0]
    say(f"transfer: {source_cut.bytes_per_sample} bytes (the input, source -> first worker)")
    transfer_input = measure_transfer((1, *source_cut.shape[1:]), options.transfer_messages,
                                      options.repeats, cpus=(0, 1) if two else (None, None))
    transfer_input["cut_point"] = 0
    load_end = load_avg()

    result: dict[str, Any] = {
        "model": options.model,
        "machine": machine_info(),
        "load_avg": {"start": load_start, "end": load_end},
        "settings": {"requests": options.requests, "repeats": options.repeats,
                     "warmup": options.warmup, "window": options.window,
                     "mode": "edgepipe", "source_runs_blocks": False, "wire_dtype": "float32",
                     "input": "uint8 pixels (an image request), normalised on the first "
                              "worker; direct ORT gets the float32 input",
                     "engine_threads": 1},
        "emulation": ("workers pinned with sched_setaffinity stand in for separate devices "
                      "(one core each); the source process and this benchmark are not pinned "
                      "and share those cores; "
                      + ("links are ipc:// sockets on one machine" if options.link is None
                         else link_note)),
        "link": None if options.link is None else {
            "spec": str(options.link), "mbps": options.link.mbps,
            "delay_ms": options.link.delay_ms, "how": link_note,
            "shaped_with_tc": "tc tbf" in link_note},
        "direct": {"label": "ONNX Runtime, model.onnx, 1 thread, batch 1", **_summarise(
            reps["direct"])},
    }
    for spec in specs:
        result[spec.key] = {"label": spec.label, **layouts[spec.key],
                            **_summarise(reps[spec.key])}
    result["transfer"] = transfer
    result["transfer_input"] = transfer_input
    if options.security:
        result["security"] = run_security_bench(options, pixels, say)
    result["balance"] = balance
    direct_p50 = result["direct"]["p50_ms"]
    one_pinned = result["pipeline_1node_pinned"]["throughput_ips"]
    static = result["pipeline_2node"]["throughput_ips"] / one_pinned
    balanced = result.get("pipeline_2node_balanced", result["pipeline_2node"])
    ratios = {
        "overhead_1node": result["pipeline_1node"]["p50_ms"] / direct_p50,
        "hop_cost_ratio": transfer["frame_ms"] / transfer["raw_ms"],
        "speedup_2node": max(static, balanced["throughput_ips"] / one_pinned),
        "cpu_ratio": result["pipeline_1node"]["cpu_ms_per_request"]
        / result["direct"]["cpu_ms_per_request"],
    }
    goals, met = _goals(ratios)
    result["summary"] = {**{k: _round(v, 3) for k, v in ratios.items()},
                         "speedup_2node_static": _round(static, 3),
                         "overhead_1node_ms": _round(result["pipeline_1node"]["p50_ms"]
                                                     - direct_p50, 3),
                         "goals": goals, "met": met}
    return result


# ---------------------------------------------------------------------------- report
def format_report(result: dict[str, Any]) -> str:
    """The human-readable table of a ``run_pipeline_bench`` result."""
    m = result["machine"]
    load = result["load_avg"]
    if "direct" not in result:  # --security-only
        return "\n".join([
            f"armdi bench pipeline --security-only: {result['model']} on {m['cpu_count']} x "
            f"{m['cpu_model']}; load avg {load['start']} -> {load['end']}",
            f"{result['settings']['requests']} requests x {result['settings']['repeats']} "
            f"repetitions (median), window {result['settings']['window']} in flight for "
            "throughput, 1 in flight for latency",
            *format_security(result["security"])])
    lines = [
        f"armdi bench pipeline: {result['model']} on {m['cpu_count']} x {m['cpu_model']}; "
        f"load avg {load['start']} -> {load['end']}; frame decoder: "
        f"{m.get('frame_decoder', '?')}",
        f"{result['settings']['requests']} requests x {result['settings']['repeats']} "
        f"repetitions (median), window {result['settings']['window']} in flight for "
        "throughput, 1 in flight for latency",
        *([f"--link {result['link']['spec']}: {result['link']['how']}"]
          if result.get("link") else []),
        "",
        f"{'configuration':<38} {'img/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'compute':>8} "
        f"{'overhead':>8}  boundaries",
    ]
    rows = [("direct ORT (model.onnx, 1 thread)", result["direct"])]
    rows += [(f"pipeline: {result[k]['label']}", result[k])
             for k in ("pipeline_1node", "pipeline_1node_pinned", "pipeline_2node",
                       "pipeline_2node_balanced") if k in result]
    for label, r in rows:
        bounds = r.get("boundaries")
        compute = f"{r['compute_p50_ms']:>8.2f}" if "compute_p50_ms" in r else f"{'':>8}"
        extra = f"{r['overhead_p50_ms']:>8.2f}" if "overhead_p50_ms" in r else f"{'':>8}"
        lines.append(f"{label:<38} {r['throughput_ips']:>7.1f} {r['p50_ms']:>7.2f} "
                     f"{r['p99_ms']:>7.2f} {compute} {extra}  {bounds if bounds else ''}")
    lines.append("(latency with 1 request in flight; compute = the workers' own time per "
                 "request, overhead = latency - compute, both p50)")
    two = result["pipeline_2node"]
    stages = ", ".join(f"{n['node']} [{n['blocks'][0]},{n['blocks'][1]}) "
                       f"{n['measured_stage_ms']} ms" for n in two["nodes"])
    lines.append(f"2 workers: measured stage {stages}; source CPU "
                 f"{two.get('source_cpu_ms_per_request', math.nan):.2f} ms/request, all "
                 f"processes {two.get('cpu_ms_per_request', math.nan):.2f} ms/request; "
                 f"workers' CPU use (cores) {two.get('worker_cpu_util')}")
    for key, what in (("transfer", "the 2-worker boundary"), ("transfer_input", "the input")):
        t = result.get(key)
        if t:
            lines.append(
                f"transfer of {t['bytes']} B ({what}, cut point {t['cut_point']}), one way "
                f"between two processes: raw pynng {t['raw_ms']:.3f} ms, frame hop "
                f"{t['frame_ms']:.3f} ms (x{t['frame_ms'] / t['raw_ms']:.2f})")
    lines += [
        "(emulation: " + result["emulation"] + ")",
        "",
        f"{'ratio':<16} {'measured':>9} {'goal':>8}  met",
    ]
    s = result["summary"]
    for key in GOALS:
        lines.append(f"{key:<16} {s[key]:>9.3f} {s['goals'][key]:>8}  "
                     f"{'yes' if s['met'][key] else 'NO'}")
    lines.append(f"(overhead_1node = {s['overhead_1node_ms']:.2f} ms over ORT alone; "
                 f"speedup_2node at the balanced boundary, {s['speedup_2node_static']:.3f} at "
                 "the static one; cpu_ratio = CPU of every process per image, 1 worker, "
                 "against ORT alone)")
    if "security" in result:
        lines += format_security(result["security"])
    b = result.get("balance")
    if b:
        lines.append(f"balanced boundary: {b['balanced']} (static {b['static']}); "
                     f"throughput by boundary {b['throughput_ips']}")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write ``result``, with the command line that made it (``armdi bench report`` shows
    it) unless it has one."""
    import shlex

    if "command" not in result and sys.argv and sys.argv[0]:
        result = {"command": shlex.join(["armdi", *sys.argv[1:]]), **result}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def _main(argv: list[str]) -> int:
    """``python -m appliance.bench transfer-send|transfer-recv SPEC``: the transfer ends."""
    if len(argv) != 2 or argv[0] not in ("transfer-send", "transfer-recv"):
        print("usage: python -m appliance.bench transfer-send|transfer-recv SPEC_JSON",
              file=sys.stderr)
        return 2
    _transfer_child(argv[0].removeprefix("transfer-"), json.loads(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
