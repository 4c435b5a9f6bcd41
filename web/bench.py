"""``armdi bench rest``: what the HTTP front end costs on top of the pipeline, measured side by
side in one run.

The CLI starts a cluster and its source (this process), and hands the source here. The web
front end is served from this process too, as ``armdi serve`` does (uvicorn on a socket from
``web.server.listen``, so kept-alive connections have TCP_NODELAY); the clients run in a
process of their own (``web.bench_client``), each on its own kept-alive connection, as real
clients do. Measured:

1. **overhead**: requests one at a time, a 224x224 JPEG to ``POST /v1/classify`` and its
   preprocessed tensor to ``POST /v2/models/{model}/infer`` (binary tensor extension),
   alternating. For each, the client's end-to-end time minus the pipeline's own latency for
   that very request (the source's ``latency_ms``, recorded as the app calls the pipeline);
   p50 and p99. The JPEG figure includes decoding, resizing and cropping the image
   (``Pipeline.prepare_image``), which the pipeline's latency does not; **decode** reports
   that cost alone (in this process, the function the front end calls).
2. **throughput** with 1, 4 and 16 concurrent clients for v2 binary tensors and JPEGs, and the
   pipeline's own throughput with the same number of requests in flight (``Pipeline.infer``
   called in this process, no HTTP), in turn, ``repeats`` times in a rotating order; each
   figure is the median. ``ratio`` is HTTP over the pipeline's own.

This is a benchmark, not a test: it asserts nothing; it reports the figures and the goals.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.api import (
    Classification,
    InferenceResult,
    Pipeline,
    PipelineStatus,
    QueueFullError,
)
from appliance.bench import _quantile
from engines.manifest import Manifest

Progress = Callable[[str], None]

GOALS: dict[str, tuple[str, float]] = {
    "v2_overhead_p50_ms": ("<=", 3.0),
    "jpeg_overhead_p50_ms": ("<=", 3.0),
    "v2_ratio_4_clients": (">=", 0.9),
}
HEADER = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class RestBenchOptions:
    requests: int = 300
    """Requests of each kind in the overhead measurement."""
    clients: tuple[int, ...] = (1, 4, 16)
    duration_s: float = 3.0
    """Seconds per throughput measurement."""
    repeats: int = 3
    """Repetitions of every throughput measurement; figures are the median."""
    warmup: int = 30
    image: Path | None = None
    """A JPEG to send (default: scikit-image's cat, or a synthetic photo without it)."""


# --------------------------------------------------------------------------- helpers
quantile = _quantile  # the pipeline bench's (linear interpolation between closest ranks)


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": round(quantile(values, 0.5), 3), "p99_ms": round(quantile(values, 0.99), 3),
            "n": len(values)}


def sample_jpeg(image: Path | None = None) -> bytes:
    """A 224x224 JPEG (quality 90) of a photo."""
    from PIL import Image

    if image is not None:
        return image.read_bytes()
    try:
        import skimage.data

        pixels = skimage.data.chelsea()  # type: ignore[no-untyped-call]
    except ImportError:  # a smooth synthetic photo: gradients plus a little noise
        y, x = np.mgrid[0:300, 0:451]
        rng = np.random.default_rng(0)
        pixels = np.stack([x / 451 * 255, y / 300 * 255, (x + y) / 751 * 255], axis=-1)
        pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((224, 224)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def v2_binary_request(tensor: np.ndarray, manifest: Manifest) -> tuple[bytes, int]:
    """An infer request with the tensor as binary data and the output as binary data."""
    raw = np.ascontiguousarray(tensor, dtype="<f4").tobytes()
    header = json.dumps({"inputs": [{"name": manifest.input.name, "datatype": "FP32",
                                     "shape": list(tensor.shape),
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + raw, len(header)


class RecordingPipeline:
    """``pipeline`` as the app sees it, noting the pipeline's own latency of every request."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.inner = pipeline
        self.latencies: list[float] = []
        self._lock = threading.Lock()

    @property
    def manifest(self) -> Manifest:
        return self.inner.manifest

    def ready(self) -> bool:
        return self.inner.ready()

    def prepare_image(self, image: bytes) -> np.ndarray:
        return self.inner.prepare_image(image)

    async def infer(self, tensor: np.ndarray, timeout_s: float | None = None) -> InferenceResult:
        result = await self.inner.infer(tensor, timeout_s)
        with self._lock:
            self.latencies.append(result.latency_ms)
        return result

    async def classify(self, image: bytes, top_k: int = 5,
                       timeout_s: float | None = None) -> Classification:
        result = await self.inner.classify(image, top_k, timeout_s)
        with self._lock:
            self.latencies.append(result.latency_ms)
        return result

    def status(self) -> PipelineStatus:
        return self.inner.status()

    def set_slowdown(self, node: str, factor: float) -> None:
        self.inner.set_slowdown(node, factor)

    def fault(self, node: str, action: str, seconds: float = 3.0) -> str:
        return self.inner.fault(node, action, seconds)

    def events(self) -> AsyncIterator[dict[str, Any]]:
        return self.inner.events()

    def take(self) -> list[float]:
        with self._lock:
            taken, self.latencies = self.latencies, []
        return taken


@contextlib.contextmanager
def _served(app: Any) -> Iterator[str]:
    import uvicorn

    from web.server import listen, url_of

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    try:
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the web front end did not start")
            time.sleep(0.02)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class _Clients:
    """The client process (``web.bench_client``), one JSON line per command."""

    def __init__(self, files: Sequence[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "web.bench_client", *files], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the benchmark's client process stopped")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"client: {answer['error']}")
        return answer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask(op="quit")
        with contextlib.suppress(Exception):
            self.process.wait(timeout=10)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# --------------------------------------------------------------------------- measurements
def _own_throughput(pipeline: Pipeline, tensor: np.ndarray, in_flight: int,
                    duration_s: float) -> dict[str, float]:
    """Requests per second with ``in_flight`` requests kept in the pipeline, no HTTP."""

    async def run() -> tuple[int, int, float]:
        completed = rejected = 0
        stop_at = time.perf_counter() + duration_s

        async def loop() -> None:
            nonlocal completed, rejected
            while time.perf_counter() < stop_at:
                try:
                    await pipeline.infer(tensor)
                    completed += 1
                except QueueFullError:
                    rejected += 1
                    await asyncio.sleep(0.002)

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(in_flight)))
        return completed, rejected, time.perf_counter() - t0

    completed, rejected, seconds = asyncio.run(run())
    return {"per_s": completed / seconds, "rejected": rejected, "completed": completed}


def _own_latency(pipeline: Pipeline, tensor: np.ndarray, n: int) -> list[float]:
    async def run() -> list[float]:
        return [(await pipeline.infer(tensor)).latency_ms for _ in range(n)]

    return asyncio.run(run())


def _decode_ms(pipeline: Pipeline, jpeg: bytes, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        pipeline.prepare_image(jpeg)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def run_rest_bench(pipeline: Pipeline, options: RestBenchOptions,
                   progress: Progress = lambda _m: None) -> dict[str, Any]:
    """Measure ``pipeline`` (started, ready) with and without the HTTP front end."""
    from engines.preprocess import decode_image, preprocess
    from web.app import create_app
    from web.limits import ApiLimits  # one client address drives the whole benchmark

    manifest = pipeline.manifest
    jpeg = sample_jpeg(options.image)
    # the float32 model input, as a v2 client sends it (and as the pipeline alone is run)
    tensor = preprocess(decode_image(jpeg), manifest.preprocessing)
    body, header_length = v2_binary_request(tensor, manifest)
    recorder = RecordingPipeline(pipeline)
    with tempfile.TemporaryDirectory(prefix="armdi-bench-rest-") as tmp, \
            _served(create_app(recorder, limits=ApiLimits(rate_per_s=0))) as url:
        jpeg_file, v2_file = Path(tmp) / "image.jpg", Path(tmp) / "v2.bin"
        jpeg_file.write_bytes(jpeg)
        v2_file.write_bytes(body)
        clients = _Clients([str(jpeg_file), str(v2_file), str(header_length),
                            manifest.model_id])
        try:
            load_before = os.getloadavg()
            progress("warming up")
            clients.ask(op="latency", url=url, plan=["jpeg", "v2"] * options.warmup)
            _own_latency(pipeline, tensor, options.warmup)
            _decode_ms(pipeline, jpeg, options.warmup)
            recorder.take()

            progress(f"overhead: {options.requests} JPEG and {options.requests} v2 requests, "
                     "one at a time")
            plan = ["jpeg", "v2"] * options.requests
            answer = clients.ask(op="latency", url=url, plan=plan)
            inner = recorder.take()
            if len(inner) != len(plan):
                raise RuntimeError(f"{len(plan)} requests sent, {len(inner)} reached the "
                                   "pipeline")
            overhead: dict[str, list[float]] = {"jpeg": [], "v2": []}
            end_to_end: dict[str, list[float]] = {"jpeg": [], "v2": []}
            for kind, outer, own in zip(answer["kinds"], answer["ms"], inner, strict=True):
                overhead[kind].append(outer - own)
                end_to_end[kind].append(outer)
            own_latency = _own_latency(pipeline, tensor, options.requests)
            decode = _decode_ms(pipeline, jpeg, options.requests)

            throughput = _throughputs(pipeline, clients, url, tensor, options, progress)
            recorder.take()
            load_after = os.getloadavg()
        finally:
            clients.close()
    result: dict[str, Any] = {
        "model": manifest.model_id,
        "jpeg_bytes": len(jpeg), "tensor_shape": list(tensor.shape), "v2_body_bytes": len(body),
        "options": {"requests": options.requests, "clients": list(options.clients),
                    "duration_s": options.duration_s, "repeats": options.repeats},
        "pipeline_latency": _stats(own_latency),
        "end_to_end": {kind: _stats(values) for kind, values in end_to_end.items()},
        "overhead": {kind: _stats(values) for kind, values in overhead.items()},
        "decode": _stats(decode),
        "throughput": throughput,
        "load_avg": {"before": [round(v, 2) for v in load_before],
                     "after": [round(v, 2) for v in load_after]},
    }
    result["overhead"]["jpeg_without_decode"] = {
        "p50_ms": round(result["overhead"]["jpeg"]["p50_ms"] - result["decode"]["p50_ms"], 3)}
    figures = {
        "v2_overhead_p50_ms": result["overhead"]["v2"]["p50_ms"],
        "jpeg_overhead_p50_ms": result["overhead"]["jpeg_without_decode"]["p50_ms"],
        "v2_ratio_4_clients": throughput.get("4", {}).get("v2_ratio", math.nan),
    }
    result["goals"] = {name: {"value": value, "goal": f"{GOALS[name][0]} {GOALS[name][1]}",
                              "met": _met(value, *GOALS[name])}
                       for name, value in figures.items()}
    return result


def _median_or_nan(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def _met(value: float, op: str, target: float) -> bool:
    if not math.isfinite(value):
        return False
    return value <= target if op == "<=" else value >= target


def _throughputs(pipeline: Pipeline, clients: _Clients, url: str, tensor: np.ndarray,
                 options: RestBenchOptions, progress: Progress) -> dict[str, Any]:
    kinds = ("own", "v2", "jpeg")
    runs: dict[tuple[int, str], list[float]] = {}
    rejected: dict[tuple[int, str], int] = {}
    cpu_ms: dict[tuple[int, str], list[float]] = defaultdict(list)
    client_ms: dict[tuple[int, str], list[float]] = defaultdict(list)
    for repeat in range(options.repeats):
        for count in options.clients:
            order = kinds[repeat % 3:] + kinds[:repeat % 3]  # rotate: no kind always first
            for kind in order:
                progress(f"throughput {repeat + 1}/{options.repeats}: {count} "
                         f"{'in flight' if kind == 'own' else kind + ' clients'}")
                cpu0 = time.process_time()  # this process: the source and the front end
                if kind == "own":
                    own = _own_throughput(pipeline, tensor, count, options.duration_s)
                    per_s, refused = own["per_s"], int(own["rejected"])
                    done, client_cpu_s = own["completed"], 0.0
                else:
                    answer = clients.ask(op="throughput", url=url, kind=kind, clients=count,
                                         duration_s=options.duration_s)
                    per_s = answer["completed"] / answer["seconds"]
                    refused = int(answer["rejected"])
                    done, client_cpu_s = answer["completed"], answer["cpu_s"]
                server_cpu_s = time.process_time() - cpu0
                runs.setdefault((count, kind), []).append(per_s)
                rejected[(count, kind)] = rejected.get((count, kind), 0) + refused
                if done:
                    cpu_ms[(count, kind)].append(1000 * server_cpu_s / done)
                    client_ms[(count, kind)].append(1000 * client_cpu_s / done)
    table: dict[str, Any] = {}
    for count in options.clients:
        row: dict[str, Any] = {}
        for kind in kinds:
            row[f"{kind}_per_s"] = round(statistics.median(runs[(count, kind)]), 2)
            row[f"{kind}_rejected"] = rejected[(count, kind)]
            # CPU per request of this process (source + front end), and of the clients
            row[f"{kind}_server_cpu_ms"] = round(_median_or_nan(cpu_ms[(count, kind)]), 3)
            if kind != "own":
                row[f"{kind}_client_cpu_ms"] = round(_median_or_nan(client_ms[(count, kind)]),
                                                     3)
        for kind in ("v2", "jpeg"):
            own = row["own_per_s"]
            row[f"{kind}_ratio"] = round(row[f"{kind}_per_s"] / own, 3) if own else math.nan
        table[str(count)] = row
    return table


def format_report(result: dict[str, Any]) -> str:
    o, e, lat = result["overhead"], result["end_to_end"], result["pipeline_latency"]
    lines = [
        f"armdi bench rest: {result['model']}, a {result['jpeg_bytes']} B 224x224 JPEG and a "
        f"{result['v2_body_bytes']} B v2 binary request ({result['tensor_shape']} FP32)",
        "",
        "latency, one request at a time        p50 ms    p99 ms",
        f"  pipeline alone                     {lat['p50_ms']:7.2f}   {lat['p99_ms']:7.2f}",
        f"  POST /v1/classify (JPEG), HTTP     {e['jpeg']['p50_ms']:7.2f}   "
        f"{e['jpeg']['p99_ms']:7.2f}",
        f"  POST v2 infer (binary), HTTP       {e['v2']['p50_ms']:7.2f}   {e['v2']['p99_ms']:7.2f}",
        "REST overhead (HTTP minus the pipeline's latency of the same request)",
        f"  v2 binary tensor                   {o['v2']['p50_ms']:7.2f}   {o['v2']['p99_ms']:7.2f}",
        f"  JPEG, decoding included            {o['jpeg']['p50_ms']:7.2f}   "
        f"{o['jpeg']['p99_ms']:7.2f}",
        f"  JPEG decode + preprocess alone     {result['decode']['p50_ms']:7.2f}   "
        f"{result['decode']['p99_ms']:7.2f}",
        f"  JPEG, decoding excluded            {o['jpeg_without_decode']['p50_ms']:7.2f}",
        "",
        "throughput (requests/s; ratio: HTTP / the pipeline's own with as many in flight)",
        "  clients   pipeline      v2 (ratio)       JPEG (ratio)",
    ]
    for count, row in result["throughput"].items():
        lines.append(f"  {count:>7}   {row['own_per_s']:8.1f}   {row['v2_per_s']:7.1f} "
                     f"({row['v2_ratio']:.2f})   {row['jpeg_per_s']:7.1f} "
                     f"({row['jpeg_ratio']:.2f})")
    lines.append("CPU ms per request: source process (source + front end) / clients")
    lines.append("  clients   pipeline      v2                JPEG")
    for count, row in result["throughput"].items():
        lines.append(f"  {count:>7}   {row['own_server_cpu_ms']:8.2f}   "
                     f"{row['v2_server_cpu_ms']:5.2f} / {row['v2_client_cpu_ms']:4.2f}     "
                     f"{row['jpeg_server_cpu_ms']:5.2f} / {row['jpeg_client_cpu_ms']:4.2f}")
    lines.append("")
    for name, goal in result["goals"].items():
        lines.append(f"  {name:24} {goal['value']:8.3f}  goal {goal['goal']:8}  "
                     f"{'met' if goal['met'] else 'NOT met'}")
    load = result["load_avg"]
    lines.append(f"load average before {load['before']}, after {load['after']}")
    return "\n".join(lines)
