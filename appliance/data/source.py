"""The source: owns the input, starts every request, and returns exactly one result for each.

It runs its own first segment (when the allocation gives it blocks), ships the activation to
the first worker, and receives results from the last one. When it runs no blocks, a request
is sent from the caller's own thread (no hand-off); otherwise one thread runs the first
segment, off the caller's event loop. One thread receives results and completes each
request's future. Image requests travel as uint8 pixels, a quarter of float32's bytes, and
are normalised where block 0 runs. Every accepted request is kept,
with its input, until its result arrives; an overdue request is re-sent from block 0, and
results are de-duplicated by request id, so none is lost and none is returned twice. A
request that cannot finish before its deadline fails with a clear error.

In mode ``ddi`` (data-distributed) every worker holds the whole model: each request goes
whole to the live worker that would finish it first (``earliest_finish``), or to
the source itself when it runs blocks, as uint8 pixels or (``ddi_input = "jpeg"``) as the
encoded image, which the worker decodes. A re-send goes to another live worker. Mode
``hybrid`` is DDI over chains: the live workers form chains of ``chain_workers``
(``appliance.control.predict.chain_groups``), each at its own optimum, and each request goes
whole to the head of the chain that would finish it first; a worker that dies re-forms the
chains and replays only what was on its chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import queue
import signal
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.api import (
    Classification,
    Hop,
    InferenceResult,
    NodeView,
    NotReadyError,
    PipelineError,
    PipelineStatus,
    Prediction,
    QueueFullError,
    RequestTimeoutError,
)
from appliance.control.allocator import (
    Allocation,
    Snapshot,
    evaluate,
    snapshot_from_profile,
    solve,
    why_left_out,
)
from appliance.control.auto import AutoDecision, choose, hybrid_throughput, worth_switching
from appliance.control.controller import should_rebalance
from appliance.control.detector import DetectorSettings, PhiAccrual
from appliance.control.membership import RANK_GAP
from appliance.control.predict import Scenario, chain_groups
from appliance.data.engines import EngineCache
from appliance.wire import frames as fr
from appliance.wire import messages as msg
from appliance.wire.ext import ENCODED_RECORD, deadline_record
from appliance.wire.messages import MessageError
from appliance.wire.replay import ReplayError, ReplayGuard, Stamper
from appliance.wire.transport import (
    ControlClient,
    ControlServer,
    DataInbox,
    DataOutbox,
    TlsFiles,
    TransportError,
    TransportTimeout,
)
from engines.device import device_signature
from engines.errors import ArmdiError, EngineError, InputSpecError
from engines.manifest import Manifest
from engines.preprocess import Normaliser, decode_image, pixels
from engines.repository import ModelRepository

log = logging.getLogger("armdi.source")

POLL_S = 0.2
# mode auto: the runtime's own cost per request at each node (receive, check, send, Python)
# that the prediction adds to compute and links; about what `armdi bench pipeline` measures
# over ONNX Runtime alone on a 2-core x86 (0.5-1 ms)
AUTO_OVERHEAD_MS = 0.5
AUTO_EVERY_S = 5.0  # mode auto decides again this often at run time
AUTO_GAIN = 0.25  # ...and switches when another mode is predicted this much faster
AUTO_QUIET_S = 20.0  # ...but not this soon after a switch or a re-route
STALL_S = 1.0  # the pairs get this long to fix an imbalance before the source steps in
# ...and the source steps in only when the optimum is this much better: its optimum scales
# the profile by each worker's speed, which misjudges fused segments by 10-20 %, so a smaller
# gap is the pairs' to close (they measure each split) and the source would only fight them
SPREAD = ("ddi", "hybrid")  # the modes that spread whole requests over independent units
REBALANCE_GAIN = 0.25
URGENT_GAIN = 0.5  # an optimum this much better: the source steps in without waiting
URGENT_QUIET_S = 3.0  # ...but not this soon after the chain's members changed


class ConfigureError(ArmdiError):
    """A worker did not take the blocks it was given (``node`` names it)."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(message)
        self.node = node


@dataclass(frozen=True)
class WorkerRef:
    name: str
    data_addr: str
    control_addr: str
    slowdown: float = 1.0
    bandwidth_Bps: float = math.inf
    latency_ms: float = 0.0
    max_blocks: int | None = None


@dataclass(frozen=True)
class SourceSettings:
    """Everything the source needs, parsed once by the CLI."""

    name: str
    data_addr: str
    repo: Path
    model_id: str
    workers: tuple[WorkerRef, ...] = ()
    mode: str = "edgepipe"  # armdi | edgepipe | ddi | hybrid | local | auto
    ddi_input: str = "pixels"  # ddi: image requests travel as uint8 pixels | jpeg (encoded)
    chain_workers: int = 2  # hybrid: workers per chain
    backend: str = "ort"
    threads: int = 1
    slowdown: float = 1.0
    bandwidth_Bps: float = math.inf
    latency_ms: float = 0.0
    cpus: tuple[int, ...] | None = None
    run_blocks: bool = True
    max_blocks: int | None = None
    key: bytes | None = None
    wire_dtype: fr.WireDtype = "float32"
    min_workers: int = 0  # the first N live workers run at least one block each
    boundaries: tuple[int, ...] | None = None  # forced at start (benchmarks), else the optimum
    control_addr: str | None = None  # where workers reach the source (moves, joins, repairs)
    successors: int = 2  # membership: each worker is told its next N live successors
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    max_frame_bytes: int = 64 << 20
    request_timeout_s: float = 10.0
    max_attempts: int = 3
    max_in_flight: int = 64
    send_timeout_ms: int = 2000
    send_buffer: int = 8  # frames NNG buffers towards the first worker
    connect_timeout_s: float = 30.0
    tls: TlsFiles | None = None  # mutual TLS on tls+tcp:// links
    link_Bps: float | None = None  # emulated outgoing link (benches): sends take size / rate
    link_delay_s: float = 0.0  # emulated one-way delay of data frames (benches)


@dataclass
class _Pending:
    request_id: int
    tensor: np.ndarray
    future: Future[InferenceResult]
    submitted: float
    deadline: float
    attempt: int = 0
    attempt_deadline: float = 0.0
    where: str = ""  # ddi/hybrid: the node (chain head) the current attempt went to
    encoded: bool = False  # the tensor is an encoded image's bytes, shape (1, n)


@dataclass
class _WorkerState:
    ref: WorkerRef
    state: str = "starting"
    last: msg.NodeStatus | None = None
    failures: int = 0
    reason: str = ""  # why it is idle, refused or down
    detector: PhiAccrual = field(default_factory=PhiAccrual)


@dataclass
class _Metrics:
    completed: int = 0
    failed: int = 0
    retried: int = 0
    counters: Counter[str] = field(default_factory=Counter)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    done_times: deque[float] = field(default_factory=lambda: deque(maxlen=5000))


class Source:
    """Implements ``appliance.api.Pipeline``."""

    def __init__(self, settings: SourceSettings, repository: ModelRepository | None = None):
        self.settings: SourceSettings = settings
        self.repository = repository or ModelRepository(settings.repo)
        self._manifest = self.repository.load_manifest(settings.model_id)
        self.repository.check_file(self._manifest, self._manifest.weights_file)
        self.fingerprint = fr.fingerprint_from_hex(self._manifest.fingerprint)
        self.blocks = self._manifest.blocks
        self.backend = self.repository.serving_backend(self._manifest, settings.backend)
        self.workers = [_WorkerState(ref, detector=PhiAccrual(settings.detector))
                        for ref in settings.workers]
        self._recovering = threading.Lock()  # one re-route at a time
        self._last_reroute = -math.inf  # when the chain last changed members (monotonic)
        self.refusals: dict[str, str] = {}  # worker name -> why it was left out
        self.allocation: Allocation | None = None
        self._route: list[tuple[str, str, int, int]] = []  # (name, data_addr, start, end)
        # ddi/hybrid: where whole requests go (name -> data_addr): every worker that holds
        # the whole model, or each chain's head
        self._ddi: dict[str, str] = {}
        self._chains: dict[str, tuple[str, ...]] = {}  # ...each one's members (head first)
        self._kept: set[str] = set()  # ...those the last placing left as they were
        self.chain_workers = settings.chain_workers  # hybrid (mode auto may choose another)
        self._pace: dict[str, float] = {}  # ...each one's ms per request: placed, then measured
        self._ddi_local = False  # ddi: the source computes a share itself
        self._ddi_next = 0  # ddi: where the round-robin among equally loaded nodes resumes
        # ddi: the source's own share runs on a thread of its own (its sends do not wait)
        self._local: queue.Queue[tuple[_Pending, int]] = queue.Queue()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        # Unbounded by construction: only admitted requests (at most the admission limit) and
        # their retries (at most ``max_attempts`` each) are ever put on it.
        self._work: queue.Queue[tuple[_Pending, int]] = queue.Queue()
        self._configures: dict[str, msg.Configure] = {}
        self._allocated: list[str] = []  # the live workers the allocation was solved over
        self._snapshot: Snapshot | None = None  # what the allocation was solved from
        self.engines = EngineCache(self.repository, self._manifest, self.backend,
                                   settings.threads)
        self.slowdown = settings.slowdown  # set_slowdown changes it while it runs
        # the mode it runs: the configured one, or what mode auto chose at start
        self.mode = settings.mode
        self.auto: AutoDecision | None = None
        self._auto_at = -math.inf  # when mode auto last chose
        self._auto_switched = -math.inf  # ...and last switched modes
        self.optimum: Allocation | None = None  # over the measured speeds (the reference)
        self._compute_ms: float | None = None  # the source's own blocks (EWMA)
        self._last_rebalance = -math.inf
        self._last_target: tuple[int, ...] = ()
        self._last_worker_move = -math.inf
        self._stall_since: float | None = None
        self._control: ControlServer | None = None
        self._config_lock = threading.Lock()  # one reconfiguration at a time
        self._measured_bottleneck_ms = 0.0
        self._metrics = _Metrics()
        self._normalise = Normaliser(self._manifest.preprocessing)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._inbox: DataInbox | None = None
        self._outboxes: dict[str, DataOutbox] = {}
        self._clients: dict[str, ControlClient] = {}
        self._ready = False
        self._started = time.monotonic()  # reset by start(); the throughput window's origin
        self._events: deque[dict[str, Any]] = deque(maxlen=500)
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[dict[str, Any]]]]
        self._subscribers = []
        self._stamper = Stamper()  # every frame made here gets a fresh stamp (no replays)
        self._replay = ReplayGuard(require=settings.key is not None)
        self._replay.expect(self._stamper.session)
        self._beats = ReplayGuard(require=settings.key is not None,
                                  max_sessions=2 * len(settings.workers) + 8)

    # ------------------------------------------------------------------ Pipeline API
    @property
    def manifest(self) -> Manifest:
        return self._manifest

    def ready(self) -> bool:
        return self._ready and not self._stop.is_set()

    async def infer(self, tensor: np.ndarray, timeout_s: float | None = None) -> InferenceResult:
        future = self.submit(tensor, timeout_s)
        return await asyncio.wrap_future(future)

    async def classify(self, image: bytes, top_k: int = 5,
                       timeout_s: float | None = None) -> Classification:
        with self._lock:
            self._check_admission()  # before spending CPU on decoding
        if self._ships_encoded():
            future = self.submit_image(image, timeout_s)
        else:
            tensor = await asyncio.to_thread(self.prepare_image, image)
            future = self.submit(tensor, timeout_s)
        result = await asyncio.wrap_future(future)
        return self.top_k(result, top_k)

    def status(self) -> PipelineStatus:
        m = self._metrics
        now = time.monotonic()
        with self._lock:
            in_flight = len(self._pending)
            recent = [t for t in m.done_times if now - t <= 10.0]
            lat = sorted(m.latencies)
        views = [self._source_view()] + [self._worker_view(w) for w in self.workers]
        span = min(10.0, now - self._started)
        return PipelineStatus(
            model_id=self._manifest.model_id, fingerprint=self._manifest.fingerprint,
            mode=self.mode, blocks=self.blocks, ready=self.ready(), nodes=tuple(views),
            boundaries=self.boundaries(),
            optimum=self.optimum.boundaries if self.optimum else (),
            optimum_bottleneck_ms=self.optimum.bottleneck_ms if self.optimum else None,
            in_flight=in_flight, completed=m.completed, failed=m.failed, retried=m.retried,
            throughput_per_s=len(recent) / span if span > 0 else 0.0,
            latency_p50_ms=_quantile(lat, 0.5), latency_p99_ms=_quantile(lat, 0.99),
            counters=dict(m.counters),
            auto=self.auto.to_dict() if self.auto is not None else None,
        )

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        entry = (asyncio.get_running_loop(), q)
        with self._lock:
            backlog = list(self._events)[-20:]
            self._subscribers.append(entry)
        try:
            for event in backlog:
                yield event
            while True:
                yield await q.get()
        finally:
            with self._lock:
                self._subscribers.remove(entry)

    # ------------------------------------------------------------------ requests
    def prepare_image(self, image: bytes) -> np.ndarray:
        """The uint8 pixels of an encoded image, resized and cropped (normalised later, by
        whichever node runs block 0)."""
        return pixels(decode_image(image), self._manifest.preprocessing)

    def _ships_encoded(self) -> bool:
        return self.mode == "ddi" and self.settings.ddi_input == "jpeg"

    def submit_image(self, image: bytes,
                     timeout_s: float | None = None) -> Future[InferenceResult]:
        """Accept one encoded image (JPEG/PNG/...). In mode ``ddi`` with ``ddi_input =
        "jpeg"`` its bytes travel as they are and the worker decodes them; otherwise it is
        decoded here (``prepare_image``) and its pixels are submitted."""
        if not self._ships_encoded():
            return self.submit(self.prepare_image(image), timeout_s)
        if not image:
            raise InputSpecError("empty image")
        if len(image) > self.settings.max_frame_bytes // 2:
            raise InputSpecError(f"image of {len(image)} bytes: more than half the largest "
                                 f"frame ({self.settings.max_frame_bytes} bytes)")
        return self._accept(np.frombuffer(image, np.uint8)[None], timeout_s, encoded=True)

    def submit(self, tensor: np.ndarray, timeout_s: float | None = None) -> Future[InferenceResult]:
        """Accept one input of shape (1, C, H, W); the future resolves to its result.

        The input is the float32 model input, or the uint8 pixels of an image
        (``prepare_image``) that the node running block 0 normalises. Raises at once (nothing
        accepted) when the pipeline is not ready, the input has the wrong shape, or too much
        is in flight (``QueueFullError``: back-pressure)."""
        spec = self._manifest.input
        if not (isinstance(tensor, np.ndarray) and tensor.dtype == np.uint8):
            tensor = np.asarray(tensor, dtype=np.float32)
        tensor = np.ascontiguousarray(tensor)
        if tensor.shape != (1, *spec.shape[1:]):
            raise InputSpecError(f"expected an input of shape {(1, *spec.shape[1:])}, got "
                                 f"{tuple(tensor.shape)}")
        return self._accept(tensor, timeout_s)

    def _accept(self, tensor: np.ndarray, timeout_s: float | None,
                encoded: bool = False) -> Future[InferenceResult]:
        timeout = self.settings.request_timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout}")
        now = time.monotonic()
        future: Future[InferenceResult] = Future()
        with self._lock:
            self._check_admission()
            pending = _Pending(next(self._ids), tensor, future, now, now + timeout,
                               encoded=encoded)
            self._arm(pending, now)
            self._pending[pending.request_id] = pending
        request_id = pending.request_id
        future.add_done_callback(lambda f: self._on_done(request_id, f))
        self._dispatch(pending, pending.attempt)
        return future

    def _dispatch(self, pending: _Pending, attempt: int) -> None:
        """Start an attempt: here, when the source only ships the input (no hand-off to
        another thread), or on the source thread when it runs blocks first or emulates a slow
        link (neither may block a caller, which may be an event loop). In ``ddi`` and
        ``hybrid``, first pick where it goes (``_pick``); the source's own share runs on its
        ``_local`` thread."""
        if self.mode in SPREAD:
            with self._lock:
                if pending.future.done() or attempt != pending.attempt:
                    return
                pending.where = self._pick(pending)
            if pending.where == self.settings.name:
                self._local.put_nowait((pending, attempt))
            elif self.settings.link_Bps is not None:
                self._work.put_nowait((pending, attempt))
            else:
                self._attempt(pending, attempt, timeout_ms=0)
            return
        if self._first_hop()[0] > 0 or self.settings.link_Bps is not None:
            self._work.put_nowait((pending, attempt))
        else:
            self._attempt(pending, attempt, timeout_ms=0)

    def _pick(self, pending: _Pending) -> str:
        """ddi/hybrid: the node (chain) that would finish this request first, by the
        requests it holds and its pace (``earliest_finish``), near-ties in turn; a re-send
        goes to another one than the last attempt's when there is one. Call with ``_lock``
        held."""
        names = list(self._ddi) + ([self.settings.name] if self._ddi_local else [])
        if not names:
            return ""  # nobody serves now: the watchdog re-sends once a worker is back
        if pending.attempt > 1 and len(names) > 1 and pending.where in names:
            names.remove(pending.where)
        load = Counter(p.where for p in self._pending.values() if p is not pending)
        chosen = earliest_finish(names, load, self._pace, self._ddi_next)
        self._ddi_next = names.index(chosen) + 1
        return chosen

    def _check_admission(self) -> None:
        """Raise unless one more request may be admitted. Call with ``_lock`` held."""
        if not self.ready():
            raise NotReadyError("the pipeline is not ready (starting, or stopped)")
        limit = self.admission_limit()
        if len(self._pending) >= limit:
            self._metrics.counters["rejected_full"] += 1
            raise QueueFullError(f"{len(self._pending)} requests in flight (the limit now is "
                                 f"{limit}); retry shortly")

    def admission_limit(self) -> int:
        """How many requests may be in flight: at most ``max_in_flight``, and no more than the
        pipeline can finish within half the request timeout at its bottleneck's pace, so an
        admitted request is not queued past its deadline (and re-sent for nothing)."""
        bottleneck = max(self.allocation.bottleneck_ms if self.allocation else 0.0,
                         self._measured_bottleneck_ms, 0.1)
        by_time = int(0.5 * self.settings.request_timeout_s * 1000 / bottleneck)
        return max(2, min(self.settings.max_in_flight, by_time))

    def _arm(self, pending: _Pending, now: float) -> None:
        """Start the next attempt's clock. Call with ``_lock`` held.

        An attempt is overdue after its share of the request's time, or three times the
        latency expected with the work now in flight, whichever is longer."""
        share = (pending.deadline - pending.submitted) / self.settings.max_attempts
        bottleneck = max(self.allocation.bottleneck_ms if self.allocation else 0.0,
                         self._measured_bottleneck_ms)
        latency = self.allocation.latency_ms if self.allocation else 0.0
        expected_s = 3 * (latency + len(self._pending) * bottleneck) / 1000
        pending.attempt += 1
        pending.attempt_deadline = min(pending.deadline, now + max(share, expected_s))

    def _on_done(self, request_id: int, future: Future[InferenceResult]) -> None:
        """A caller that cancels its future frees the request's slot at once."""
        if future.cancelled():
            with self._lock:
                if self._pending.pop(request_id, None) is not None:
                    self._metrics.counters["cancelled"] += 1

    def top_k(self, result: InferenceResult, k: int) -> Classification:
        logits = result.output.reshape(-1).astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        k = max(1, min(k, probs.size))
        order = np.argsort(-probs)[:k]
        labels = self._manifest.labels
        top = tuple(Prediction(int(i), labels[i] if labels and i < len(labels) else str(i),
                               float(probs[i])) for i in order)
        return Classification(result.request_id, top, result.latency_ms, result.path,
                              result.attempts)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Connect to the workers, place the boundaries, open the engine, start the loops."""
        s = self.settings
        if s.mode not in ("armdi", "edgepipe", "ddi", "hybrid", "local", "auto"):
            raise ArmdiError(f"mode {s.mode!r} is not available yet; use armdi, edgepipe, "
                             "ddi, hybrid, local or auto")
        if s.chain_workers < 1:
            raise ArmdiError(f"chain_workers must be 1 or more, got {s.chain_workers}")
        if s.ddi_input not in ("pixels", "jpeg"):
            raise ArmdiError(f"ddi_input {s.ddi_input!r}: use pixels or jpeg")
        if s.cpus:
            os.sched_setaffinity(0, set(s.cpus))
        self._started = time.monotonic()
        self._inbox = DataInbox(s.data_addr, max_bytes=s.max_frame_bytes,
                                recv_buffer=s.send_buffer, tls=s.tls)
        live = self._handshake() if s.mode != "local" else []
        if s.mode == "auto":
            self.auto = self._choose_mode(live)
            self.mode = self.auto.mode
            self.chain_workers = self.auto.chain_workers or self.chain_workers
            log.info("mode auto: %s", self.auto.reason)
            self._event("auto", mode=self.mode, reason=self.auto.reason,
                        alternatives=[a.to_dict() for a in self.auto.alternatives])
            self._auto_at = time.monotonic()
            if self.mode == "local":
                live = []  # the workers stay idle
        if s.control_addr and (self.mode == "armdi" or s.mode == "auto"):
            self._control = ControlServer(s.control_addr, key=s.key, tls=s.tls)
        if self.mode in SPREAD:
            self._place_ddi(live)
        else:
            self.allocation = self._allocate(live)
            self._configure(live)
        loops = [self._source_loop, self._watchdog_loop, self._poll_loop]
        # results are taken on NNG's thread that received them (one thread hand-off less per
        # request); a thread of our own receives them where the C codec was not built
        assert self._inbox is not None
        if not self._inbox.on_message(self._on_result):
            loops.append(self._result_loop)
        if self._control is not None:
            loops.append(self._control_loop)
        if self.mode in SPREAD or s.mode == "auto":  # auto may switch to ddi later
            loops.append(self._local_loop)
        for target in loops:
            thread = threading.Thread(target=target, name=target.__name__, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._ready = True
        assert self.allocation is not None
        self._event("ready", boundaries=list(self.allocation.boundaries),
                    route=self._serving())

    def close(self) -> None:
        with self._lock:
            self._ready = False
            self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._inbox is not None:
            self._inbox.close()  # no result callback runs after this
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for p in pending:
            _resolve(p.future, error=NotReadyError("the pipeline stopped"))
        for box in self._outboxes.values():
            box.close()
        for client in self._clients.values():
            client.close()
        if self._control is not None:
            self._control.close()
        self.engines.close()
        self.repository.close()

    def _client(self, w: _WorkerState) -> ControlClient:
        with self._lock:
            client = self._clients.get(w.ref.name)
            if client is None:
                client = ControlClient(w.ref.control_addr, key=self.settings.key,
                                       tls=self.settings.tls)
                self._clients[w.ref.name] = client
            return client

    def _hello(self) -> msg.Hello:
        return msg.Hello(node=self.settings.name, fingerprint=self._manifest.fingerprint,
                         model_id=self._manifest.model_id, blocks=self.blocks,
                         backends=(self.backend,), pid=os.getpid())

    def _handshake(self) -> list[_WorkerState]:
        """Hello to every worker until it answers (or ``connect_timeout_s``); a worker that
        serves another model version is refused with the reason and left out."""
        deadline = time.monotonic() + self.settings.connect_timeout_s
        waiting = list(self.workers)
        live: list[_WorkerState] = []
        hello = self._hello()
        while waiting and time.monotonic() < deadline:
            for w in list(waiting):
                try:
                    reply = self._client(w).request(hello, timeout_ms=1000)
                except MessageError as exc:  # it answered, but not in our cluster's key
                    reply = msg.Ack(ok=False, reason=f"its reply was rejected ({exc}); do both "
                                                     "use the same cluster key?")
                except ArmdiError:
                    continue
                waiting.remove(w)
                if isinstance(reply, msg.HelloReply) and reply.ok:
                    w.state = "up"
                    live.append(w)
                else:
                    self._refuse(w, reply)
            if waiting:
                time.sleep(0.1)
        tls_hint = (" (over TLS: is its certificate one of this cluster's CA?)"
                    if self.settings.tls is not None else "")
        for w in waiting:
            w.state = "down"
            w.reason = (f"did not answer at {w.ref.control_addr} within "
                        f"{self.settings.connect_timeout_s:.0f} s{tls_hint}")
            log.error("worker %s did not answer at %s within %.0f s%s; continuing without it",
                      w.ref.name, w.ref.control_addr, self.settings.connect_timeout_s, tls_hint)
            self._event("unreachable", node=w.ref.name, address=w.ref.control_addr)
        return [w for w in self.workers if w in live]

    def _refuse(self, w: _WorkerState, reply: msg.ControlMessage, when: str = "") -> None:
        """Leave ``w`` out, saying why; for another model version, with the commands that
        ship this source's model to it."""
        w.state = "refused"
        reason = getattr(reply, "reason", repr(reply))
        if isinstance(reply, msg.HelloReply) and reply.fingerprint != self._manifest.fingerprint:
            model, repo = self._manifest.model_id, self.settings.repo
            reason = (f"{reason}. Fix: on the source run `armdi pack {model} -o {model}.tar "
                      f"--repo {repo}`, copy {model}.tar to {w.ref.name} and there run "
                      f"`armdi unpack {model}.tar --repo {repo}`, then restart its armdi node")
        self.refusals[w.ref.name] = w.reason = reason
        log.error("worker %s refused%s: %s", w.ref.name, when, reason)
        self._event("refused", node=w.ref.name, reason=reason)

    def _choose_mode(self, live: list[_WorkerState],
                     scenario: Scenario | None = None) -> AutoDecision:
        """Mode auto: the mode predicted fastest over the live workers, from the profile,
        the configured links and speeds (``scenario``, built here unless given), and each
        device's block cap."""
        s = self.settings
        scenario = scenario or self._auto_scenario(live)
        try:
            return choose(scenario, worker_max_blocks=[w.ref.max_blocks for w in live] or [0],
                          source_runs_blocks=s.run_blocks, source_max_blocks=s.max_blocks,
                          source_speed=self.slowdown)
        except ValueError as exc:
            raise ArmdiError(f"mode auto: {exc}") from exc

    def _auto_scenario(self, live: list[_WorkerState]) -> Scenario:
        """What mode auto predicts from: the profile, the configured links, the speeds the
        workers measure (``_speed_of``)."""
        s = self.settings
        profile = self._manifest.profile_for(device_signature(), self.backend)
        base = tuple(profile.block_ms) if profile else (1.0,) * self.blocks
        refs = [w.ref for w in live]
        links = [s.bandwidth_Bps] + [r.bandwidth_Bps for r in refs]
        serving = set(self._serving())
        return Scenario(
            block_ms=base, activation_bytes=tuple(self._manifest.activation_bytes()),
            link_Bps=min(links), latency_ms=max([s.latency_ms] + [r.latency_ms for r in refs]),
            speeds=tuple(_speed_of(w, w.ref.name in serving) for w in live) or (1.0,),
            overhead_ms=AUTO_OVERHEAD_MS)

    def _maybe_switch_mode(self) -> None:
        """Mode auto at run time: decide again every ``AUTO_EVERY_S`` with the speeds the
        workers measure, and switch when another mode is predicted ``AUTO_GAIN`` faster
        than the one running (not within ``AUTO_QUIET_S`` of a switch or a re-route, nor
        while a worker is starting, joining or down)."""
        now = time.monotonic()
        if (now - self._auto_at < AUTO_EVERY_S or now - self._last_reroute < AUTO_QUIET_S
                or self.auto is None
                or any(w.state not in ("up", "slow", "idle", "dead", "refused")
                       for w in self.workers)):
            return
        live = [w for w in self.workers if w.state in ("up", "slow", "idle")]
        scenario = self._auto_scenario(live)
        try:
            decision = self._choose_mode(live, scenario)
        except ArmdiError as exc:
            log.warning("mode auto: %s", exc)
            return
        self._auto_at = now
        predicted = {a.mode: a.throughput_ips for a in decision.alternatives if a.feasible}
        current = predicted.get(self.mode, 0.0)
        if self.mode == "hybrid":  # at the chain length it runs, not the best one
            current = hybrid_throughput(scenario, [w.ref.max_blocks for w in live],
                                        self.chain_workers)
        if not worth_switching(decision, self.mode, self.chain_workers, current, AUTO_GAIN):
            self.auto = dataclasses.replace(decision, mode=self.mode,
                                            reason=f"staying with {self.mode}: "
                                                   f"{decision.reason}")
            return
        if now - self._auto_switched < AUTO_QUIET_S:
            return
        self._switch_mode(decision, live)

    def _switch_mode(self, decision: AutoDecision, live: list[_WorkerState]) -> None:
        """Run another mode now: configure the workers for it, then replay what is in
        flight (the old mode's results that still come are duplicates, dropped)."""
        with self._recovering, self._config_lock:
            old, self.mode, self.auto = self.mode, decision.mode, decision
            self.chain_workers = decision.chain_workers or self.chain_workers
            self._auto_switched = time.monotonic()
            if self.mode not in SPREAD:  # nothing goes to ddi's units from now on
                with self._lock:
                    self._ddi, self._chains, self._kept, self._ddi_local = {}, {}, set(), False
            try:
                if self.mode in SPREAD:
                    self._place_ddi(live, timeout_ms=2000)
                elif self.mode == "local":
                    self.allocation = self._allocate([])
                    self._configure([], timeout_ms=2000)
                    for w in live:  # idle now: no blocks
                        w.state, w.reason = "idle", "mode auto runs the model on the source"
                        with contextlib.suppress(ArmdiError):
                            self._unassign(w, (self.settings.name,), 2000)
                else:
                    self.allocation = self._allocate(live)
                    self._configure(live, timeout_ms=2000)
            except ConfigureError as exc:
                log.warning("mode auto: switching to %s: %s; re-routing", self.mode, exc)
                bad = next((w for w in live if w.ref.name == exc.node), None)
                if bad is not None:
                    bad.state, bad.reason = "dead", f"could not be configured: {exc}"
            self._metrics.counters["mode_switches"] += 1
            self._event("auto", mode=self.mode, previous=old, reason=decision.reason,
                        alternatives=[a.to_dict() for a in decision.alternatives])
            log.warning("mode auto: %s -> %s: %s", old, self.mode, decision.reason)
        if any(w.state == "dead" for w in live):
            self._reroute(f"mode auto: a worker failed the switch to {self.mode}")
            return
        self._replay_pending()  # everything: the old mode's units are not the new mode's

    def _allocate(self, live: list[_WorkerState]) -> Allocation:
        s = self.settings
        if self.mode == "local" or not live:
            snap = snapshot_from_profile([self._base_profile()],
                                         self._manifest.activation_bytes())
            self._snapshot = snap
            return evaluate(snap, [0, self.blocks])
        refs = [w.ref for w in live]
        self._allocated = [r.name for r in refs]
        forced = min(s.min_workers, len(refs))
        if forced < s.min_workers:
            log.warning("min_workers = %d, but only %d workers are live; forcing those",
                        s.min_workers, forced)
        snap = self._snapshot_over(refs, source_blocks=s.max_blocks if s.run_blocks else 0,
                                   forced=forced)
        self._snapshot = snap
        if s.boundaries is not None:
            if len(s.boundaries) != len(refs) + 2:
                raise ArmdiError(f"boundaries {list(s.boundaries)} need {len(refs) + 2} entries "
                                 f"(the source and {len(refs)} live workers)")
            allocation = evaluate(snap, s.boundaries)
        else:
            allocation = solve(snap)
        for n, w in enumerate(live, start=1):
            w.reason = why_left_out(snap, allocation, n) if s.boundaries is None else (
                "" if n in allocation.used else "boundaries set by hand: no blocks")
        return allocation

    def _allocate_over(self, members: list[_WorkerState]) -> Allocation:
        """hybrid (and ddi, one worker each): the optimum of one chain over ``members``,
        the source only shipping the input."""
        return solve(self._snapshot_over([w.ref for w in members], source_blocks=0))

    def _base_profile(self) -> list[float]:
        profile = self._manifest.profile_for(device_signature(), self.backend)
        return list(profile.block_ms) if profile else [1.0] * self.blocks

    def _snapshot_over(self, refs: list[WorkerRef], source_blocks: int | None,
                       forced: int = 0) -> Snapshot:
        """The allocator's view of the source (running at most ``source_blocks``) and
        ``refs``: the profile scaled by each one's slowdown, links, memory caps."""
        s, base = self.settings, self._base_profile()
        return snapshot_from_profile(
            [base] + [base] * len(refs),
            self._manifest.activation_bytes(),
            bandwidth_Bps=[s.bandwidth_Bps] + [r.bandwidth_Bps for r in refs],
            latency_ms=[s.latency_ms] + [r.latency_ms for r in refs],
            slowdown=[s.slowdown] + [r.slowdown for r in refs],
            max_blocks=[source_blocks] + [r.max_blocks for r in refs],
            must_use=[False] + [i < forced for i in range(len(refs))],
        )

    def _configure(self, live: list[_WorkerState], timeout_ms: int = 30_000) -> None:
        assert self.allocation is not None
        b = self.allocation.boundaries
        names = [self.settings.name] + [w.ref.name for w in live]
        addrs = [self.settings.data_addr] + [w.ref.data_addr for w in live]
        used = [n for n in range(len(names)) if b[n] < b[n + 1]]
        route = [(names[n], addrs[n], b[n], b[n + 1]) for n in used]
        chain = [r[0] for r in route]
        members = self._members(route, live)
        for i, (name, _addr, start, end) in enumerate(route):
            if i == 0 and name == self.settings.name:
                continue
            nxt = route[i + 1][1] if i + 1 < len(route) else None
            worker = next(w for w in live if w.ref.name == name)
            prev = route[i - 1][0] if i > 0 else None
            up = self._link_of(prev) if prev else (None, 0.0)
            down = self._link_of(name)
            prev_ctl = (self.settings.control_addr if prev == self.settings.name
                        else next((w.ref.control_addr for w in live if w.ref.name == prev),
                                  None))
            configure = msg.Configure(
                node=name, start=start, end=end, successor_addr=nxt or None,
                result_addr=self.settings.data_addr, wire_dtype=self.settings.wire_dtype,
                chain=tuple(chain), adaptive=self.mode == "armdi" and prev is not None
                and prev_ctl is not None, predecessor=prev, predecessor_control_addr=prev_ctl,
                upstream_Bps=up[0], upstream_latency_ms=up[1], downstream_Bps=down[0],
                downstream_latency_ms=down[1], session=self._stamper.session.hex(),
                **self._membership_fields(name, members))
            self._send_configure(worker, configure, timeout_ms)
        for w in live:
            if w.ref.name in chain:
                w.state = "up"
                w.detector.expect(time.monotonic())  # it beats from now on, or is dead
                continue
            w.state = "idle"
            log.warning("worker %s runs no blocks: %s", w.ref.name, w.reason)
            self._unassign(w, tuple(chain), timeout_ms)
        if route and route[0][0] == self.settings.name:
            self.engines.load_now(route[0][2], route[0][3])
        self._route = route
        log.info("allocation %s over %s", list(b), chain)

    def _members(self, route: list[tuple[str, str, int, int]],
                 live: list[_WorkerState]) -> list[msg.MemberInfo]:
        """The workers of the route as members of the line, ranked in order."""
        refs = {w.ref.name: w.ref for w in live}
        return [msg.MemberInfo(name=name, data_addr=refs[name].data_addr,
                               control_addr=refs[name].control_addr, rank=(i + 1) * RANK_GAP)
                for i, (name, *_rest) in enumerate(route) if name in refs]

    def _membership_fields(self, name: str, members: list[msg.MemberInfo]) -> dict[str, Any]:
        """Configure's membership fields for ``name`` (mode armdi only: the static baseline
        has no recovery): itself, its predecessor, its next r successors, the anchor."""
        if self.mode != "armdi":
            return {}
        i = next(k for k, m in enumerate(members) if m.name == name)
        return {"me": members[i], "predecessor_member": members[i - 1] if i > 0 else None,
                "successors": tuple(members[i + 1: i + 1 + self.settings.successors]),
                "anchor_control_addr": self.settings.control_addr}

    def _unassign(self, w: _WorkerState, chain: tuple[str, ...], timeout_ms: int,
                  always: bool = False) -> None:
        """A worker that ran blocks runs none from now on (told so with an empty range;
        ``always``: even when it was given none here)."""
        if self._configures.pop(w.ref.name, None) is not None or always:
            self._client(w).request(msg.Configure(
                node=w.ref.name, start=0, end=0, successor_addr=None,
                result_addr=self.settings.data_addr, wire_dtype=self.settings.wire_dtype,
                chain=chain), timeout_ms=timeout_ms)

    def _place_ddi(self, live: list[_WorkerState], timeout_ms: int = 30_000) -> None:
        """ddi: every live worker that holds the whole model runs whole requests and returns
        results here; hybrid: the live workers in chains of ``chain_workers`` (each at its
        own optimum, the source running none of it) do. The source computes a share too
        when it runs blocks (or alone, when nothing else can)."""
        s = self.settings
        length = self.chain_workers if self.mode == "hybrid" else 1
        groups = chain_groups([w.ref.max_blocks for w in live], self.blocks, length)
        heads: dict[str, str] = {}
        chains: dict[str, tuple[str, ...]] = {}
        units: list[Allocation] = []
        placed: set[str] = set()
        with self._lock:  # if this placing fails half-way, nothing is as it was
            previous, self._chains = self._chains, {}
        for group in groups:
            members = [live[i] for i in group]
            allocation = self._allocate_over(members)
            b = allocation.boundaries
            route = [(w, b[n], b[n + 1]) for n, w in enumerate(members, start=1)
                     if n in allocation.used]
            names = tuple(w.ref.name for w, _start, _end in route)
            for i, (w, start, end) in enumerate(route):
                nxt = route[i + 1][0].ref.data_addr if i + 1 < len(route) else None
                self._send_configure(w, msg.Configure(
                    node=w.ref.name, start=start, end=end, successor_addr=nxt,
                    result_addr=s.data_addr, wire_dtype=s.wire_dtype, chain=(s.name, *names),
                    session=self._stamper.session.hex()), timeout_ms)
                w.state, w.reason = "up", ""
                w.detector.expect(time.monotonic())  # it beats from now on, or is dead
            heads[names[0]] = route[0][0].ref.data_addr
            chains[names[0]] = names
            placed.update(names)
            units.append(allocation)
        dropped = {live[i].ref.name: [live[j] for j in g]  # chains that cannot hold it
                   for g in chain_groups([None] * len(live), self.blocks, length)
                   if g not in groups for i in g}
        for w in live:
            if w.ref.name in placed:
                continue
            w.state = "idle"
            chain = dropped.get(w.ref.name, [])
            if length > 1 and chain:
                caps = sum(self.blocks if x.ref.max_blocks is None else x.ref.max_blocks
                           for x in chain)
                w.reason = (f"its chain ({', '.join(x.ref.name for x in chain)}) holds at "
                            f"most {caps} of the {self.blocks} blocks (max_blocks)")
            elif chain:
                w.reason = (f"holds at most {w.ref.max_blocks} of the {self.blocks} blocks "
                            "(max_blocks)")
            else:
                w.reason = "its chain's optimum gives it no blocks"
            with contextlib.suppress(ArmdiError):  # also one that rejoined: its old
                self._unassign(w, (s.name,), timeout_ms, always=True)  # successor is stale
        local = s.run_blocks or not heads
        if local:
            self.engines.load_now(0, self.blocks)
        own = [[u.stage_ms[n] for n in u.used if n > 0] for u in units]  # not the source's
        pace = {h: max(o, default=0.0) for h, o in zip(heads, own, strict=True)}
        latencies = [math.fsum(o) for o in own]
        if local:
            pace[s.name] = self._whole_ms() * self.slowdown
            latencies.append(pace[s.name])
        with self._lock:
            self._pace = pace
            self._kept = {h for h, names in chains.items() if previous.get(h) == names}
            self._kept |= {s.name} if local and self._ddi_local else set()
            self._ddi, self._chains, self._ddi_local = heads, chains, local
            self._route, self._allocated, self._snapshot = [], [], None
        self.allocation = self._spread_allocation(list(pace.values()), latencies,
                                                  ships=bool(heads))
        log.info("%s over %s", self.mode, [list(c) for c in chains.values()]
                 + ([s.name] if local else []))

    def _send_configure(self, w: _WorkerState, configure: msg.Configure,
                        timeout_ms: int) -> None:
        """Give one worker its range (and remember it); ConfigureError unless it took it."""
        name, start, end = w.ref.name, configure.start, configure.end
        self._configures[name] = configure
        try:
            reply = self._client(w).request(configure, timeout_ms=timeout_ms)
        except ArmdiError as exc:
            raise ConfigureError(name, f"worker {name} did not take blocks [{start}, {end}): "
                                       f"{exc}") from exc
        if not (isinstance(reply, msg.Ack) and reply.ok):
            raise ConfigureError(name, f"worker {name} rejected blocks [{start}, {end}): "
                                       f"{getattr(reply, 'reason', reply)}")

    def _whole_ms(self) -> float:
        """The whole model's profiled time on this device (ms)."""
        profile = self._manifest.profile_for(device_signature(), self.backend)
        return math.fsum(profile.block_ms) if profile else float(self.blocks)

    def _measure_paces(self) -> None:
        """ddi/hybrid: each unit's pace as measured (a chain's slowest member), where every
        member has measured one; the placed one until then."""
        by_name = {w.ref.name: w for w in self.workers}
        paces = {}
        for head, members in self._chains.items():
            stages = [w.last.compute_ms_ewma + w.last.send_ms_ewma
                      for w in (by_name.get(m) for m in members)
                      if w is not None and w.last is not None and w.last.processed > 0]
            if len(stages) == len(members):
                paces[head] = max(stages)
        if self._ddi_local and self._compute_ms is not None:
            paces[self.settings.name] = self._compute_ms
        with self._lock:
            self._pace.update((n, t) for n, t in paces.items() if n in self._pace)

    def _spread_allocation(self, paces: list[float], latencies: list[float],
                           ships: bool) -> Allocation:
        """What admission and re-sending go by in ddi/hybrid: the units' (workers', chains',
        the source's own) paces side by side, and the source's link, which every input
        crosses when it ``ships`` them, as the bottleneck; the slowest unit's latency."""
        pace = 1.0 / sum(1.0 / max(t, 1e-6) for t in paces)
        ship = 0.0
        if ships and not math.isinf(self.settings.bandwidth_Bps):
            pixels_bytes = self._manifest.activation_bytes()[0] // 4  # uint8 of float32's
            ship = pixels_bytes / self.settings.bandwidth_Bps * 1000 + self.settings.latency_ms
        return Allocation(boundaries=(0, self.blocks), stage_ms=tuple(paces),
                          bottleneck_ms=max(pace, ship), latency_ms=ship + max(latencies),
                          used=tuple(range(len(paces))))

    def _serving(self) -> list[str]:
        """The nodes that run requests now: the chain, or in ddi/hybrid every node that
        serves (each chain's members)."""
        if self.mode in SPREAD:
            return [n for head in self._ddi for n in self._chains.get(head, (head,))] + (
                [self.settings.name] if self._ddi_local else [])
        return [r[0] for r in self._route]

    def _link_of(self, name: str) -> tuple[float | None, float]:
        """A node's outgoing link as the config gives it: (bytes/s or None if free, ms)."""
        if name == self.settings.name:
            rate, latency = self.settings.bandwidth_Bps, self.settings.latency_ms
        else:
            ref = next(w.ref for w in self.workers if w.ref.name == name)
            rate, latency = ref.bandwidth_Bps, ref.latency_ms
        return (None if math.isinf(rate) else rate), latency

    def set_boundaries(self, boundaries: tuple[int, ...] | list[int],
                       timeout_ms: int = 30_000) -> Allocation:
        """Place the boundaries by hand over the live workers (benchmarks sweep them): the
        workers are configured with their new ranges, then the source routes by them.
        Frames in flight that a worker no longer runs are re-sent by the watchdog."""
        if self.mode == "ddi":
            raise PipelineError("mode ddi has no boundaries: every worker runs the whole model")
        if self.mode == "hybrid":
            raise PipelineError("mode hybrid has no boundaries to set: each chain is placed at "
                                "its own optimum")
        with self._config_lock:
            if self._snapshot is None:
                raise NotReadyError("the pipeline has not started")
            allocation = evaluate(self._snapshot, list(boundaries))
            live = [w for w in self.workers if w.ref.name in self._allocated]
            previous, self.allocation = self.allocation, allocation
            for n, w in enumerate(live, start=1):
                w.reason = "" if n in allocation.used else "boundaries set by hand: no blocks"
            try:
                self._configure(live, timeout_ms=timeout_ms)
            except ConfigureError:
                self.allocation = previous  # the route is still the old one (callers re-route)
                raise
            self._event("boundaries_set", boundaries=list(allocation.boundaries),
                        route=[r[0] for r in self._route])
            return allocation

    # ------------------------------------------------------------------ loops
    def _first_hop(self) -> tuple[int, str | None]:
        """How many blocks the source runs, and where it sends the activation."""
        if not self._route:
            return 0, None
        if self._route[0][0] == self.settings.name:
            nxt = self._route[1][1] if len(self._route) > 1 else None
            return self._route[0][3], nxt
        return 0, self._route[0][1]

    def _local_loop(self) -> None:
        """ddi: the source's own share of whole requests."""
        while not self._stop.is_set():
            try:
                pending, attempt = self._local.get(timeout=POLL_S)
            except queue.Empty:
                continue
            self._attempt(pending, attempt)

    def _source_loop(self) -> None:
        while not self._stop.is_set():
            try:
                pending, attempt = self._work.get(timeout=POLL_S)
            except queue.Empty:
                continue
            self._attempt(pending, attempt)

    def _attempt(self, pending: _Pending, attempt: int, timeout_ms: int | None = None) -> None:
        """Run one attempt of a request; every failure ends in the request's outcome or in
        a count (the watchdog re-sends what did not go out). ``timeout_ms=0`` (a caller's
        thread, perhaps an event loop: it must not block) hands a send that cannot go out
        at once to the source thread."""
        if timeout_ms is None:
            timeout_ms = self.settings.send_timeout_ms
        if pending.future.done() or attempt != pending.attempt:
            return  # answered, cancelled, or superseded by a newer attempt
        try:
            if not self._start_request(pending, timeout_ms):
                self._work.put_nowait((pending, attempt))  # full now: the source thread waits
        except (EngineError, InputSpecError) as exc:  # will not go away on a retry
            self._finish_error(pending.request_id, exc)
        except ArmdiError as exc:  # e.g. a send timeout: the watchdog re-sends
            self._metrics.counters["dispatch_error"] += 1
            log.warning("request %d attempt %d: %s", pending.request_id, attempt, exc)
        except Exception as exc:
            self._loop_error("dispatch", exc)
            self._finish_error(pending.request_id, PipelineError(f"internal error: {exc}"))

    def _start_request(self, pending: _Pending, timeout_ms: int) -> bool:
        """Run the source's own blocks, if any, and send the activation on. False when the
        send did not go out within ``timeout_ms`` (0: the outbox's buffer is full now)."""
        end, nxt = self._first_hop()
        if self.mode in SPREAD:  # the whole model here, or whole to a worker (chain)
            local = pending.where == self.settings.name
            end, nxt = (self.blocks, None) if local else (0, self._ddi.get(pending.where))
        if end == 0 and nxt is None:  # its node left meanwhile: the watchdog re-sends it
            self._metrics.counters["no_route"] += 1
            return True
        x = pending.tensor
        trace: tuple[fr.TraceEntry, ...] = ()
        if end > 0:
            t0 = time.perf_counter()
            if pending.encoded:
                x = self.prepare_image(x.tobytes())
            if x.dtype == np.uint8:
                x = self._normalise(x)
            x = self.engines.get(0, end).infer(x)
            compute_s = time.perf_counter() - t0
            if self.slowdown > 1.0:  # emulation: computed, now wait the rest
                self._stop.wait(compute_s * (self.slowdown - 1.0))
            ms = (time.perf_counter() - t0) * 1000
            self._compute_ms = ms if self._compute_ms is None else (
                self._compute_ms + 0.2 * (ms - self._compute_ms))
            trace = (fr.TraceEntry(node=self.settings.name, start=0, end=end, ms=ms),)
        if end == self.blocks or nxt is None:
            self._complete(pending.request_id, pending.attempt, x, trace)
            return True
        if end > 0:
            x = fr.cast_for_wire(x, self.settings.wire_dtype)
        frame = fr.Frame(kind=fr.FrameKind.ACTIVATION, request_id=pending.request_id,
                         attempt=pending.attempt, fingerprint=self.fingerprint,
                         start_block=end, tensor=x, trace=trace,
                         ext=deadline_record((pending.attempt_deadline - time.monotonic()) * 1000)
                         + self._stamper.next() + (ENCODED_RECORD if pending.encoded else b""))
        try:
            self._outbox(nxt).send_frame(fr.frame_parts(frame, self.settings.key),
                                         timeout_ms=timeout_ms)
        except TransportTimeout:
            if timeout_ms == 0:
                return False
            self._metrics.counters["send_failed"] += 1
            log.warning("request %d: send to %s timed out", pending.request_id, nxt)
        except TransportError as exc:
            self._metrics.counters["send_failed"] += 1
            log.warning("request %d: send to %s failed: %s", pending.request_id, nxt, exc)
        return True

    def _outbox(self, addr: str) -> DataOutbox:
        box = self._outboxes.get(addr)
        if box is None:
            with self._lock:
                box = self._outboxes.get(addr)
                if box is None:
                    box = self._outboxes[addr] = DataOutbox(
                        addr, send_buffer=self.settings.send_buffer, tls=self.settings.tls,
                        rate_Bps=self.settings.link_Bps, delay_s=self.settings.link_delay_s)
        return box

    def _control_loop(self) -> None:
        """Boundary moves from the first worker (it owns the boundary on its left)."""
        assert self._control is not None
        while not self._stop.is_set():
            try:
                self._control.serve_once(self._handle_control, timeout_ms=int(POLL_S * 1000))
            except Exception as exc:  # the requester got an Ack(ok=False); keep serving
                if not self._stop.is_set():
                    log.warning("control message failed: %s", exc)

    def _handle_control(self, message: msg.ControlMessage) -> msg.ControlMessage:
        if isinstance(message, msg.MoveBoundary):
            return self._move_end(message)
        if isinstance(message, msg.Stabilise):
            return self._anchor_report(message)
        if isinstance(message, msg.Join):
            return self._join(message)
        if isinstance(message, msg.StatusRequest):
            return msg.Ack(ok=True, reason="source")
        return msg.Ack(ok=False, reason=f"the source does not take {type(message).__name__}")

    def _move_end(self, m: msg.MoveBoundary) -> msg.Ack:
        """The first worker moves the boundary between us: the source now runs [0, b)."""
        with self._config_lock:
            route = list(self._route)
            # (the first worker, which decides, keeps a block of its own: it checked its end)
            if (len(route) < 2 or route[0][0] != self.settings.name
                    or route[1][0] != m.node or not 0 < m.boundary < self.blocks):
                return msg.Ack(ok=False, reason=f"the source cannot end at block {m.boundary}")
            name, addr, start, _old = route[0]
            self.engines.load_now(start, m.boundary)  # before the switch: the old range serves
            self.engines.preload([(start, m.boundary - 1), (start, m.boundary + 1)])
            route[0] = (name, addr, start, m.boundary)
            nxt = route[1]
            route[1] = (nxt[0], nxt[1], m.boundary, nxt[3])
            self._route = route
        return msg.Ack(ok=True, reason="")

    def set_slowdown(self, node: str, factor: float) -> None:
        """Change a node's emulated slowdown while it runs (experiments and demos)."""
        if not (math.isfinite(factor) and 1.0 <= factor <= 1e6):
            raise ValueError(f"slowdown factor must be in 1..1e6, got {factor}")
        if node == self.settings.name:
            self.slowdown = factor
        else:
            w = next((w for w in self.workers if w.ref.name == node), None)
            if w is None:
                raise KeyError(node)
            reply = self._client(w).request(msg.SetSlowdown(factor=factor), timeout_ms=2000)
            if not (isinstance(reply, msg.Ack) and reply.ok):
                raise PipelineError(f"{node} refused the slowdown: "
                                    f"{getattr(reply, 'reason', reply)}")
        self._metrics.counters["slowdowns_set"] += 1
        self._event("slowdown", node=node, factor=factor)

    def _result_loop(self) -> None:
        assert self._inbox is not None
        while not self._stop.is_set():
            try:
                buf = self._inbox.recv(timeout_ms=int(POLL_S * 1000))
            except TransportError:
                continue
            self._on_result(buf)

    def _on_result(self, buf: memoryview) -> None:
        try:
            self._take_result(buf)
        except Exception as exc:
            self._loop_error("result loop", exc)

    def _take_result(self, buf: memoryview) -> None:
        try:
            frame = fr.decode_frame(buf, key=self.settings.key,
                                    max_bytes=self.settings.max_frame_bytes)
            if frame.fingerprint != self.fingerprint:
                raise fr.FrameError("result for another model fingerprint")
            if frame.kind == fr.FrameKind.HEARTBEAT:  # each worker stamps its own beats
                if self.settings.key is not None:
                    self._beats.check(frame, buf, tagged=True)
                self._beat(frame.trace[0].node if frame.trace else "")
                return
            if frame.kind == fr.FrameKind.ACTIVATION:
                raise fr.FrameError("unexpected ACTIVATION frame at the source")
            expected = tuple(self._manifest.output.shape[1:])
            if frame.kind == fr.FrameKind.RESULT and (
                    frame.tensor.ndim != len(expected) + 1 or frame.tensor.shape[0] != 1
                    or tuple(frame.tensor.shape[1:]) != expected):
                raise fr.FrameError(f"result of shape {tuple(frame.tensor.shape)}, the model "
                                    f"outputs {('1', *expected)}")
            if self.settings.key is not None:  # without one, forging is as easy as replaying
                self._replay.check(frame, buf, tagged=True)
        except fr.FrameError as exc:
            self._metrics.counters[exc.reason if isinstance(exc, ReplayError) else "bad_frame"] += 1
            log.warning("dropped a result frame: %s", exc)
            return
        if frame.kind == fr.FrameKind.ERROR:  # a worker could not run it: no use re-sending
            where = frame.trace[-1].node if frame.trace else "a worker"
            self._finish_error(frame.request_id, PipelineError(
                f"request {frame.request_id} failed on {where}: {frame.error}"))
            return
        self._complete(frame.request_id, frame.attempt,
                       np.array(fr.to_compute_dtype(frame.tensor)), frame.trace)

    def _complete(self, request_id: int, attempt: int, output: np.ndarray,
                  trace: tuple[fr.TraceEntry, ...]) -> None:
        now = time.monotonic()
        with self._lock:
            pending = self._pending.pop(request_id, None)
            if pending is None:
                self._metrics.counters["duplicate_results"] += 1
                return
            latency = (now - pending.submitted) * 1000
            self._metrics.completed += 1
            self._metrics.latencies.append(latency)
            self._metrics.done_times.append(now)
        path = tuple(Hop(t.node, t.start, t.end, t.ms) for t in trace)
        _resolve(pending.future, InferenceResult(request_id, output, latency, path,
                                                 attempts=attempt))

    def _finish_error(self, request_id: int, error: Exception) -> None:
        with self._lock:
            pending = self._pending.pop(request_id, None)
            if pending is None:
                return
            self._metrics.failed += 1
        _resolve(pending.future, error=error)

    def _loop_error(self, where: str, exc: Exception) -> None:
        """A bug must not kill a loop silently: log it, count it, keep going."""
        self._metrics.counters["internal_errors"] += 1
        log.error("%s: unexpected %s: %s", where, type(exc).__name__, exc, exc_info=exc)

    def _watchdog_loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                now = time.monotonic()
                if self.mode in ("armdi", *SPREAD):  # edgepipe only re-sends
                    self._check_liveness(now)
                self._check_deadlines(now)
            except Exception as exc:
                self._loop_error("watchdog", exc)

    # ------------------------------------------------------------------ failures
    def _beat(self, node: str) -> None:
        w = next((w for w in self.workers if w.ref.name == node), None)
        if w is not None:
            w.detector.heartbeat(time.monotonic())

    def _check_liveness(self, now: float) -> None:
        """A worker of the chain whose heartbeats stopped is dead: route around it now."""
        in_chain = set(self._serving())
        dead = [w for w in self.workers if w.ref.name in in_chain
                and w.state not in ("dead", "refused") and w.detector.dead(now)]
        for w in dead:
            w.state = "dead"
            w.reason = (f"silent for {(now - (w.detector.last or now)) * 1000:.0f} ms "
                        f"(phi {w.detector.phi(now):.1f} > "
                        f"{self.settings.detector.phi_threshold:g})")
            self._metrics.counters["deaths"] += 1
            log.error("worker %s is dead: %s; routing around it", w.ref.name, w.reason)
            self._event("node_dead", node=w.ref.name, reason=w.reason)
        if dead:
            threading.Thread(target=self._reroute, args=("dead: " + ", ".join(
                w.ref.name for w in dead),), name="reroute", daemon=True).start()

    def _reroute(self, why: str, replay: bool = True) -> None:
        """Place the boundaries over the live workers again, configure them, and replay
        every request in flight (a result that was not lost after all is a duplicate and
        is dropped: each request still gets exactly one); ``replay=False`` for a join,
        where nothing was lost (frames say where they are)."""
        with self._recovering, self._config_lock:
            self._last_reroute = time.monotonic()
            for _ in range(3):
                live = [w for w in self.workers if w.state not in ("dead", "refused", "down")]
                try:
                    if self.mode in SPREAD:
                        self._place_ddi(live, timeout_ms=2000)
                    else:
                        self.allocation = self._allocate(live)
                        self._configure(live, timeout_ms=2000)
                    break
                except ConfigureError as exc:  # a worker that cannot be configured: out too
                    log.warning("re-route: %s", exc)
                    bad = next(w for w in live if w.ref.name == exc.node)
                    bad.state, bad.reason = "dead", f"could not be configured: {exc}"
            route = self._serving()
            kept = set(self._kept) if self.mode in SPREAD else None
            self._metrics.counters["reroutes"] += 1
            self._event("rerouted", why=why, boundaries=list(self.boundaries()), route=route)
            log.warning("re-routed (%s): %s over %s", why, list(self.boundaries()), route)
        if not replay:
            return
        self._replay_pending(kept)

    def _replay_pending(self, kept: set[str] | None = None) -> None:
        """Every request in flight again, as a new attempt (a result of the old attempt that
        was not lost after all is a duplicate, dropped: each request still gets one); in
        ddi/hybrid, ``kept`` spares those on a unit the last placing left as it was."""
        now = time.monotonic()
        with self._lock:
            pending = list(self._pending.values())
            if kept:  # only what was on a node (chain) that changed
                pending = [p for p in pending if p.where not in kept]
            for p in pending:
                self._arm(p, now)
        for p in pending:
            self._metrics.retried += 1
            self._dispatch(p, p.attempt)

    # ------------------------------------------------------------------ membership
    def _anchor_report(self, m: msg.Stabilise) -> msg.StabiliseReply:
        """A worker whose successors all stopped answering (or the last one) asks the
        source, the anchor that admits every join and sees every death: the live members
        of the route after it."""
        live = [w for w in self.workers if w.state not in ("dead", "refused", "down")]
        members = self._members(list(self._route), live)
        names = [x.name for x in members]
        if m.caller.name not in names:
            return msg.StabiliseReply(node=self.settings.name)
        i = names.index(m.caller.name)
        after = members[i + 1: i + 1 + self.settings.successors]
        return msg.StabiliseReply(node=self.settings.name, successors=tuple(after))

    def _join(self, m: msg.Join) -> msg.Ack:
        """A worker asks to join (directly, or forwarded by any member): check its model
        version, admit it and re-allocate over the live workers, it included."""
        name, info = m.member.name, m.member
        if m.fingerprint != self._manifest.fingerprint:
            model, repo = self._manifest.model_id, self.settings.repo
            reason = (f"{name} serves {m.model_id} fingerprint {m.fingerprint[:12]}, the source "
                      f"serves {model} fingerprint {self._manifest.fingerprint[:12]}. Fix: on "
                      f"the source run `armdi pack {model} -o {model}.tar --repo {repo}`, copy "
                      f"it to {name}, there run `armdi unpack {model}.tar`, then start its node "
                      "again")
            self._metrics.counters["joins_refused"] += 1
            log.error("join of %s refused: %s", name, reason)
            self._event("refused", node=name, reason=reason)
            return msg.Ack(ok=False, reason=reason)
        w = next((w for w in self.workers if w.ref.name == name), None)
        if name == self.settings.name or (w is not None and (
                w.ref.data_addr, w.ref.control_addr) != (info.data_addr, info.control_addr)):
            where = "the source" if w is None else f"a worker at {w.ref.control_addr}"
            return msg.Ack(ok=False, reason=f"the name {name} is taken by {where}; give this "
                                            "node another --name")
        if w is not None:
            if w.state in ("dead", "down"):  # it is back: rejoin now, not at the next poll
                threading.Thread(target=self._rejoin, args=(w,), name="rejoin",
                                 daemon=True).start()
                return msg.Ack(ok=True, reason="rejoining")
            return msg.Ack(ok=True, reason=f"already a member ({w.state})")
        w = _WorkerState(WorkerRef(name, info.data_addr, info.control_addr),
                         state="joining", detector=PhiAccrual(self.settings.detector))
        self.workers = [*self.workers, w]  # one rebinding: readers see the old or new list
        self._metrics.counters["joins"] += 1
        log.warning("worker %s joins (hops %d); re-allocating", name, m.hops)
        self._event("joined", node=name, hops=m.hops, via="a worker" if m.hops else "source")
        threading.Thread(target=self._reroute, args=(f"{name} joined",),
                         kwargs={"replay": False}, name="join", daemon=True).start()
        return msg.Ack(ok=True, reason="admitted")

    def fault(self, node: str, action: str, seconds: float = 3.0) -> str:
        """Inject a fault (tests, demos): kill, pause, resume or cut ``node``. A worker on
        this machine gets real signals (SIGKILL, SIGSTOP/SIGCONT); another is told to
        emulate the fault itself. Returns what was done."""
        if action not in ("kill", "pause", "resume", "cut"):
            raise ValueError(f"fault {action!r}: use kill, pause, resume or cut")
        w = next((w for w in self.workers if w.ref.name == node), None)
        if w is None:
            raise KeyError(node)
        pid = w.last.pid if w.last is not None else 0
        if pid == 0:  # not polled yet: ask, so a worker here gets the real signal
            with contextlib.suppress(ArmdiError):
                reply = self._client(w).request(msg.StatusRequest(), timeout_ms=1000)
                pid = reply.pid if isinstance(reply, msg.NodeStatus) else 0
        local = pid > 0 and _is_local_worker(pid, node)
        done = f"{action} {node}"
        if local and action in ("kill", "pause", "resume"):
            sig = {"kill": signal.SIGKILL, "pause": signal.SIGSTOP,
                   "resume": signal.SIGCONT}[action]
            os.kill(pid, sig)
            if action == "pause":
                timer = threading.Timer(seconds, _signal_quietly, args=(pid, signal.SIGCONT))
                timer.daemon = True
                timer.start()
                done += f" for {seconds:g} s"
            done += f" (signal to pid {pid})"
        else:
            reply = self._client(w).request(msg.Fault(action=action,  # type: ignore[arg-type]
                                                      seconds=seconds), timeout_ms=2000)
            if not (isinstance(reply, msg.Ack) and reply.ok):
                raise PipelineError(f"{node} refused the fault: "
                                    f"{getattr(reply, 'reason', reply)}")
            done += f" for {seconds:g} s (emulated by the node)" if action != "kill" else ""
        self._metrics.counters["faults_injected"] += 1
        self._event("fault", node=node, action=action, seconds=seconds, detail=done)
        return done

    def _check_deadlines(self, now: float) -> None:
        with self._lock:
            overdue = [p for p in self._pending.values() if now >= p.attempt_deadline]
        for p in overdue:
            if now >= p.deadline or p.attempt >= self.settings.max_attempts:
                self._finish_error(p.request_id, RequestTimeoutError(
                    f"request {p.request_id}: no result after {p.attempt} attempt(s) in "
                    f"{now - p.submitted:.1f} s; check the node logs and GET /v1/pipeline "
                    "for down nodes"))
                continue
            with self._lock:
                if self._pending.get(p.request_id) is not p:
                    continue  # answered meanwhile
                self._arm(p, now)
            self._metrics.retried += 1
            self._dispatch(p, p.attempt)
            self._event("retry", request_id=p.request_id, attempt=p.attempt)

    def _poll_loop(self) -> None:
        while not self._stop.wait(1.0):
            for w in self.workers:
                if w.state == "refused":
                    continue
                try:
                    self._poll(w)
                except Exception as exc:
                    self._loop_error("poll loop", exc)
            used = [w.last.compute_ms_ewma + w.last.send_ms_ewma for w in self.workers
                    if w.last is not None and w.state == "up" and w.last.processed > 0]
            self._measured_bottleneck_ms = max(used, default=0.0)
            if self.mode in SPREAD and used:  # they work side by side
                self._measured_bottleneck_ms /= len(self._ddi) + int(self._ddi_local) or 1
            if self.mode in SPREAD:
                self._measure_paces()
            try:
                self.optimum = self._measured_optimum()
                if self.mode == "armdi":
                    self._maybe_rebalance()
                if self.settings.mode == "auto":
                    self._maybe_switch_mode()
            except Exception as exc:
                self._loop_error("optimum", exc)

    def _maybe_rebalance(self) -> None:
        """Place the exact optimum at once when the pairwise moves left the chain far above
        it (they can stall where only a cascade helps); rare by design: a big gain, at most
        once a minute, the same target not twice, and only after ``STALL_S`` without a
        pairwise move while the gap persists (without that wait when the gap is over
        ``URGENT_GAIN``: a device that just became several times slower)."""
        optimum, now = self.optimum, time.monotonic()
        live = self._live_bottleneck_ms()
        # A device several times slower than a moment ago (the optimum 1.5x better): pairs
        # moving a boundary at a time would take seconds, each pair blind to the next one's
        # side; the source, which sees the whole chain, places the optimum without waiting.
        # Not right after a re-route or a join (the measurements still hold the old chain's)
        # nor while a worker of the chain is not up (a death is being handled).
        silent = any(now - (w.detector.last or now) > 3 * self.settings.detector.interval_ms
                     / 1000 for w in self.workers if w.ref.name in {r[0] for r in self._route})
        if silent:  # a worker of the chain missed its heartbeats: the detector decides first
            self._stall_since = None
            return
        urgent = (optimum is not None and live is not None
                  and now - self._last_reroute > URGENT_QUIET_S
                  and all(w.state in ("up", "slow") for w in self.workers
                          if w.ref.name in {r[0] for r in self._route})
                  and should_rebalance(live, optimum.bottleneck_ms, URGENT_GAIN))
        if (optimum is None or live is None or optimum.boundaries == self.boundaries()
                or not should_rebalance(live, optimum.bottleneck_ms, REBALANCE_GAIN)
                or (now - self._last_worker_move < STALL_S and not urgent)):
            self._stall_since = None  # the pairs are working on it, or nothing to fix
            return
        if self._stall_since is None:
            self._stall_since = now
        target = optimum.boundaries
        if (now - self._stall_since < 0.5 or now - self._last_rebalance < 60.0
                or target == self._last_target):
            return  # (seen on two polls in a row, so not a single noisy reading)
        self._last_rebalance, self._last_target = now, target
        before = list(self.boundaries())
        serving = {r[0] for r in self._route}
        try:
            self.set_boundaries(target, timeout_ms=2000)  # as a re-route: a worker may be dying
        except ConfigureError as exc:  # a worker died meanwhile: not half a chain, a re-route
            bad = next((w for w in self.workers if w.ref.name == exc.node), None)
            if bad is not None and bad.state != "dead":
                bad.state, bad.reason = "dead", f"could not be configured: {exc}"
                self._metrics.counters["deaths"] += 1
                log.error("worker %s is dead: %s; routing around it", bad.ref.name, bad.reason)
                self._event("node_dead", node=bad.ref.name, reason=bad.reason)
            self._reroute(f"a rebalance could not configure {exc.node}")
            return
        self._metrics.counters["rebalances"] += 1
        self._event("rebalanced", boundaries=list(target), before=before,
                    detail=f"measured bottleneck {live:.2f} ms, the optimum at the measured "
                           f"speeds {optimum.bottleneck_ms:.2f} ms")
        if serving - {r[0] for r in self._route}:
            # a worker left out now drops the frames it still holds (it runs no blocks and
            # has no successor): replay what is in flight rather than wait for time-outs
            self._replay_pending()

    def _live_bottleneck_ms(self) -> float | None:
        """The largest measured stage time in the chain (None until every stage measured)."""
        stages = []
        in_chain = {r[0] for r in self._route}
        if self.settings.name in in_chain:
            if self._compute_ms is None:
                return None
            stages.append(self._compute_ms)
        for w in self.workers:
            if w.ref.name in in_chain:
                if w.last is None or w.last.processed == 0:
                    return None
                stages.append(w.last.compute_ms_ewma + w.last.send_ms_ewma)
        return max(stages, default=None)

    def _measured_optimum(self) -> Allocation | None:
        """The exact optimum over the live workers at their measured speeds (profiled block
        times scaled by measured / profiled): the reference the controller is judged by."""
        snap = self._snapshot
        if snap is None or snap.workers != len(self._allocated) + 1:
            return None
        rows = [list(snap.block_ms[0])]
        if self._compute_ms is not None and self._route and self._route[0][0] == self.settings.name:
            profiled = sum(snap.block_ms[0][: self._route[0][3]]) / max(self.slowdown, 1.0)
            if profiled > 0:
                rows[0] = [t / max(self.slowdown, 1.0) * self._compute_ms / profiled
                           for t in snap.block_ms[0]]
        by_name = {w.ref.name: w for w in self.workers}
        profile = self._manifest.profile_for(device_signature(), self.backend)
        base = list(profile.block_ms) if profile else [1.0] * self.blocks
        for n, name in enumerate(self._allocated, start=1):
            last = by_name[name].last
            if last is not None and last.speed > 0:
                rows.append([t * last.speed for t in base])
            else:
                rows.append(list(snap.block_ms[n]))
        return solve(dataclasses.replace(snap, block_ms=tuple(tuple(r) for r in rows)))

    def _rejoin(self, w: _WorkerState) -> None:
        """A dead worker that answers again (restarted, resumed, reconnected) is given blocks
        and the chain re-balances to use it."""
        try:
            reply = self._client(w).request(self._hello(), timeout_ms=300)
        except ArmdiError:
            return
        if not (isinstance(reply, msg.HelloReply) and reply.ok):
            return
        w.detector.reset()
        w.state, w.reason, w.last = "up", "", None
        self._configures.pop(w.ref.name, None)
        log.warning("worker %s answers again; it rejoins the chain", w.ref.name)
        self._event("rejoined", node=w.ref.name)
        self._metrics.counters["rejoins"] += 1
        self._reroute(f"{w.ref.name} rejoined")

    def _poll(self, w: _WorkerState) -> None:
        if w.state == "dead" and self.mode in ("armdi", *SPREAD):
            self._rejoin(w)
            return
        try:
            reply = self._client(w).request(msg.StatusRequest(), timeout_ms=500)
        except ArmdiError:
            w.failures += 1
            if w.failures >= 3 and w.state != "down":
                w.state = "down"
                self._event("node_down", node=w.ref.name)
            return
        if not isinstance(reply, msg.NodeStatus):
            return
        came_back = w.state == "down"
        previous, w.last, w.failures = w.last, reply, 0
        seen = previous.moves if previous is not None else 0
        if reply.moves > seen:
            self._last_worker_move = time.monotonic()
            self._metrics.counters["boundary_moves"] += reply.moves - seen
            self._event("boundary_moved", node=w.ref.name, detail=reply.last_move,
                        boundaries=list(self.boundaries()), swap_ms=round(reply.swap_ms, 2),
                        fused_load_ms=round(reply.fused_load_ms, 2))
        failovers = reply.failovers - (previous.failovers if previous is not None else 0)
        if failovers > 0:  # it sent frames past a successor that stopped taking them
            self._metrics.counters["failovers"] += failovers
            self._event("failover", node=w.ref.name, frames=failovers,
                        successors=list(reply.successors))
        configure = self._configures.get(w.ref.name)
        if configure is not None and reply.end == 0 < configure.end:
            # restarted (or reset): give it its blocks again, where the chain has them now
            end = previous.end if previous is not None and previous.end > 0 else configure.end
            start = previous.start if previous is not None else configure.start
            configure = configure.model_copy(update={"start": min(start, end), "end": end})
            self._configures[w.ref.name] = configure
            self._reconfigure(w, configure)
            if w.state == "refused":
                return
        if came_back:
            self._event("node_up", node=w.ref.name)
        w.state = "up" if configure is not None else "idle"
        if w.state == "up" and self._is_slow(w):
            w.state = "slow"  # alive (its heartbeats come), but its blocks run slowly

    def _reconfigure(self, w: _WorkerState, configure: msg.Configure) -> None:
        hello = self._hello()
        client = self._client(w)
        reply = client.request(hello, timeout_ms=1000)
        if not (isinstance(reply, msg.HelloReply) and reply.ok):
            self._refuse(w, reply, " on rejoining")
            return
        ack = client.request(configure, timeout_ms=30_000)
        if isinstance(ack, msg.Ack) and ack.ok:
            log.info("worker %s rejoined; gave it blocks [%d, %d) again", w.ref.name,
                     configure.start, configure.end)
            self._event("rejoined", node=w.ref.name, blocks=[configure.start, configure.end])

    def _is_slow(self, w: _WorkerState) -> bool:
        """Measured over twice as slow against its profile as the others' median."""
        speeds = [x.last.speed for x in self.workers if x is not w
                  and x.last is not None and x.last.speed > 0 and x.state in ("up", "slow")]
        if w.last is None or w.last.speed <= 0 or not speeds:
            return False
        return w.last.speed > 2.0 * statistics.median(speeds)

    # ------------------------------------------------------------------ status helpers
    def boundaries(self) -> tuple[int, ...]:
        """Where the boundaries are now, over the source and the live workers (a worker's
        range as it last reported it; the allocation's before that)."""
        if self.allocation is None:
            return ()
        bounds = list(self.allocation.boundaries)
        if self._route and self._route[0][0] == self.settings.name:
            bounds[1] = self._route[0][3]
        by_name = {w.ref.name: w for w in self.workers}
        for n, name in enumerate(self._allocated, start=1):
            last = by_name[name].last
            if last is not None and last.end > 0 and n + 1 < len(bounds):
                bounds[n + 1] = last.end
        return tuple(bounds)

    def _source_view(self) -> NodeView:
        start, end = (self._route[0][2], self._route[0][3]) if (
            self._route and self._route[0][0] == self.settings.name) else (0, 0)
        if self.mode in SPREAD:
            start, end = (0, self.blocks) if self._ddi_local else (0, 0)
        stage = self.allocation.stage_ms[0] if self.allocation else None
        return NodeView(self.settings.name, "source", start, end,
                        "up" if self.ready() else "starting", stage, self._work.qsize(),
                        self.settings.max_in_flight, self._metrics.completed,
                        self.settings.data_addr, slowdown=self.slowdown,
                        optimum_stage_ms=self._optimum_stage_ms(self.settings.name))

    def _worker_view(self, w: _WorkerState) -> NodeView:
        """What a worker runs: its own report once polled, its configured range before."""
        last = w.last
        if last is not None:
            start, end = last.start, last.end
            stage: float | None = last.compute_ms_ewma + last.send_ms_ewma
            if last.processed == 0:
                stage = None
        else:
            configure = self._configures.get(w.ref.name)
            start, end = (configure.start, configure.end) if configure else (0, 0)
            stage = None
        if stage is None and self.allocation is not None and start < end:
            index = self._route_index(w.ref.name)
            stage = self.allocation.stage_ms[index] if index is not None else None
        return NodeView(w.ref.name, "worker", start, end, w.state, stage,
                        last.queue_depth if last else 0,
                        last.queue_capacity if last else 0,
                        last.processed if last else 0, w.ref.data_addr, w.reason,
                        slowdown=last.slowdown if last else w.ref.slowdown,
                        speed=(last.speed or None) if last else None,
                        link_Bps=(last.link_Bps or None) if last else None,
                        moves=last.moves if last else 0,
                        optimum_stage_ms=self._optimum_stage_ms(w.ref.name))

    def _optimum_stage_ms(self, name: str) -> float | None:
        """The node's stage time in the exact optimum at the measured speeds (the status
        page marks it against the measured one); None while unknown or left out."""
        if self.optimum is None or self.allocation is None:
            return None
        index = self._route_index(name)
        if index is None or index >= len(self.optimum.stage_ms):
            return None
        return self.optimum.stage_ms[index] or None

    def _route_index(self, name: str) -> int | None:
        """The worker's index in the allocation (0 is the source), or None if not live."""
        assert self.allocation is not None
        names = [self.settings.name, *self._allocated]
        return names.index(name) if name in names else None

    def _event(self, kind: str, **data: Any) -> None:
        event = {"type": kind, "time": time.time(), **data}
        with self._lock:
            self._events.append(event)
            subscribers = list(self._subscribers)
        for loop, q in subscribers:
            try:
                loop.call_soon_threadsafe(_offer, q, event)
            except RuntimeError:  # that subscriber's event loop is closed
                with self._lock:
                    if (loop, q) in self._subscribers:
                        self._subscribers.remove((loop, q))



TIE = 0.05  # expected finishes this close are a tie, served in turn


def earliest_finish(names: list[str], load: Mapping[str, int], pace: Mapping[str, float],
                    turn: int) -> str:
    """ddi/hybrid's pick: the unit whose queue would finish one more request first,
    ``(requests it holds + 1) x its ms per request``; equal units by their load alone, and
    finishes within ``TIE`` of the best in turn from ``turn`` (round-robin among equals).
    A unit of unknown pace counts as the fastest known."""
    known = [t for n in names if (t := pace.get(n, 0.0)) > 0]
    fallback = min(known, default=1.0)

    def finish(n: str) -> float:
        t = pace.get(n, 0.0)
        return (load.get(n, 0) + 1) * (t if t > 0 else fallback)

    best = min(finish(n) for n in names)
    k = turn % len(names)
    return next(n for n in names[k:] + names[:k] if finish(n) <= best * (1 + TIE))


def _speed_of(w: _WorkerState, serving: bool) -> float:
    """A worker's slowdown against the profile, for mode auto's prediction: what it measures
    on the blocks it runs now (its status's ``speed``), else its emulated slowdown as it last
    reported it, else the configured one. (An idle worker's measured speed is stale, and one
    that never ran counts as the profiled device: optimistic, which ``AUTO_GAIN`` and
    ``AUTO_QUIET_S`` keep from turning into switching to and fro.)"""
    if serving and w.last is not None and w.last.speed > 0 and w.last.processed > 0:
        return max(w.last.speed, 1e-3)
    return w.last.slowdown if w.last is not None else w.ref.slowdown


def _is_local_worker(pid: int, node: str) -> bool:
    """Whether ``pid`` is the ``armdi node --name NODE`` process on this machine."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"node" in cmdline and node.encode() in cmdline


def _signal_quietly(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _resolve(future: Future[InferenceResult], result: InferenceResult | None = None,
             error: BaseException | None = None) -> None:
    """Set a future's outcome unless its caller cancelled it meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        pass


def _offer(q: asyncio.Queue[dict[str, Any]], event: dict[str, Any]) -> None:
    if not q.full():
        q.put_nowait(event)


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[
        min(98, max(0, round(q * 100) - 1))]
