"""A worker node: receive activation frames, run ``[start_block, end)``, forward.

The data path is one loop on one thread: receive, check, compute, send, receive... NNG
receives and sends on its own I/O threads and buffers whole messages, so the loop needs no
Python threads to overlap the network with compute: a frame that arrives while the engine
runs waits in the inbox's buffer (``queue_depth`` frames), and a send returns as soon as the
message is in the outbox's buffer (``queue_depth`` frames) while NNG writes it out. When the
successor stops taking frames, the send buffer fills, the send blocks, the loop stops
receiving, and the inbox's buffer fills in turn: back-pressure reaches the sender without a
queue of ours. Each thread wake-up costs 50-100 us on small machines, as much as a hop.

A second thread answers control messages (and loads engines on ``Configure``); the main
thread only watches for the parent process. Every blocking call has a timeout, so ``stop``
ends all of them promptly. A bad frame is counted, logged and dropped; it never stops the node.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from appliance.control.controller import ControllerSettings
from appliance.control.membership import Member
from appliance.data.adaptive import LeftBoundary
from appliance.data.engines import EngineCache
from appliance.data.fused_builds import FusedBuilds
from appliance.data.neighbours import Neighbours
from appliance.wire import ext as frame_ext
from appliance.wire import frames as fr
from appliance.wire import messages as msg
from appliance.wire.replay import ReplayGuard, Stamper
from appliance.wire.transport import (
    ControlClient,
    ControlServer,
    DataInbox,
    DataOutbox,
    TlsFiles,
    TransportClosed,
    TransportError,
    TransportTimeout,
)
from engines.device import device_signature
from engines.errors import ArmdiError
from engines.manifest import Manifest
from engines.preprocess import Normaliser, decode_image, pixels
from engines.repository import ModelRepository

log = logging.getLogger("armdi.node")

POLL_MS = 200
SEND_SLICE_MS = 100  # a blocked send looks again where frames go (a re-route) this often
MAX_JOIN_HOPS = 4
JOIN_RETRY = "try again"  # an Ack reason that starts so: the joiner asks again in a second
RESEND_GRACE_S = 1.0  # frames sent to a dead successor go again this long after, unless the
# source re-routed meanwhile (it replays them itself; two replays would double the work)
SUSPECT_S = 1.0  # a successor whose send timed out is passed over this long
SPEED_STEP = 4.0  # one frame moves the speed estimate by at most this factor (see compute)
SEEN_ATTEMPTS = 4096  # requests whose newest attempt a node remembers (to drop older ones)


def load_emulated_times(path: Path, blocks: int) -> dict[tuple[int, int], float]:
    """Measured segment times for emulated compute: a JSON object ``{"start:end": ms}`` (as
    ``armdi bench adaptive`` writes for scenario he), checked against the model's blocks."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ArmdiError(f"emulate_times {path}: cannot read it as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ArmdiError(f"emulate_times {path}: expected a JSON object of \"start:end\": ms")
    times = {}
    for key, ms in data.items():
        start, colon, end = str(key).partition(":")
        if not (colon and start.isdigit() and end.isdigit()
                and 0 <= int(start) < int(end) <= blocks):
            raise ArmdiError(f"emulate_times {path}: {key!r} is not a range start:end of the "
                             f"model's {blocks} blocks")
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms < 1e6:
            raise ArmdiError(f"emulate_times {path}: {key!r}: {ms!r} is not a time in ms")
        times[(int(start), int(end))] = float(ms)
    return times


class FrameRejected(fr.FrameError):
    """A well-formed frame this node cannot run; ``reason`` names the counter."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class NodeSettings:
    """Everything a node process needs, parsed once by the CLI."""

    name: str
    data_addr: str
    control_addr: str
    repo: Path
    model_id: str
    backend: str = "ort"
    threads: int = 1
    slowdown: float = 1.0
    cpus: tuple[int, ...] | None = None
    key: bytes | None = None
    max_frame_bytes: int = 64 << 20
    queue_depth: int = 8  # frames NNG buffers on receive, and again on send
    send_timeout_ms: int = 2000
    engine_budget_mb: float = 512.0  # fused segment engines kept loaded (LRU), by memory
    emulate: bool = False  # emulated compute: wait the profiled time, output zeros (benches)
    emulate_scale: float = 1.0  # ...times this
    emulate_times: Path | None = None  # ...or measured segment times, {"start:end": ms}
    heartbeat_ms: float = 100.0  # a heartbeat to the source this often, from its own thread
    stabilise_ms: float = 200.0  # membership: ask the successor for its list this often
    join_addr: str | None = None  # join through this member's control address at start
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    parent_pid: int | None = None  # stop when this process is gone (armdi up's workers)
    tls: TlsFiles | None = None  # mutual TLS on tls+tcp:// links
    link_Bps: float | None = None  # emulated outgoing link (benches): sends take size / rate
    link_delay_s: float = 0.0  # emulated one-way delay of data frames (benches)


@dataclass
class Assignment:
    start: int = 0
    end: int = 0
    successor: str | None = None
    result_addr: str | None = None
    wire_dtype: fr.WireDtype = "float32"
    chain: tuple[str, ...] = ()


@dataclass
class Stats:
    processed: int = 0
    passed: int = 0  # frames forwarded untouched (a boundary moved while they travelled)
    dropped: Counter[str] = field(default_factory=Counter)
    compute_ms: float | None = None
    send_ms: float | None = None
    failovers: int = 0  # frames sent past a successor that stopped taking them
    finished_here: int = 0  # ... or run to the end here, when no successor was left
    resent: int = 0  # frames sent again past a successor found dead

    def observe(self, attr: str, value: float, alpha: float = 0.2) -> None:
        old = getattr(self, attr)
        setattr(self, attr, value if old is None else (1 - alpha) * old + alpha * value)


class Node:
    """One worker; ``run`` serves until stopped. See the module docstring."""

    def __init__(self, settings: NodeSettings, repository: ModelRepository | None = None):
        self.settings = settings
        self.repository = repository or ModelRepository(settings.repo)
        self.manifest: Manifest = self.repository.load_manifest(settings.model_id)
        self.repository.check_file(self.manifest, self.manifest.weights_file)
        self.fingerprint = fr.fingerprint_from_hex(self.manifest.fingerprint)
        self.blocks = self.manifest.blocks
        self.backend = self.repository.serving_backend(self.manifest, settings.backend)
        self.assignment = Assignment()
        self.stats = Stats()
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.slowdown = settings.slowdown  # SetSlowdown changes it while the node runs
        self.engines = EngineCache(self.repository, self.manifest, self.backend,
                                   settings.threads, settings.engine_budget_mb)
        self._fused_builds: FusedBuilds | None = None
        if self.backend == "trt" and not settings.emulate:
            # TensorRT builds only the likely fused segments up front; a range served
            # chained asks for its own, built at low priority and paused while we are busy
            self._fused_builds = FusedBuilds(settings.repo, settings.model_id)
            self.engines.on_missing = self._fused_builds.request
        profile = self.manifest.profile_for(device_signature(), self.backend)
        self._block_ms = tuple(profile.block_ms) if profile else (1.0,) * self.blocks
        self._segment_ms = dict(profile.segment_ms) if profile else {}
        self._emulated_ms = (load_emulated_times(settings.emulate_times, self.blocks)
                             if settings.emulate and settings.emulate_times else {})
        self._left: LeftBoundary | None = None  # the controller of the boundary on our left
        # Our start: the configured one, then wherever our own moves put it (we own the
        # boundary on our left; frames in flight may still start earlier, and run from there).
        self._start_seen: int | None = None
        self._speed: float | None = None  # measured / profiled time of the segment (EWMA)
        self._link_Bps: float | None = None
        self._attempts: OrderedDict[int, int] = OrderedDict()  # request id -> newest attempt
        self._session: str | None = None  # the source run whose requests those are
        self._move_at: tuple[int, float] | None = None  # (new end, when) until a frame runs
        self._move_lock = threading.Lock()  # moves of our start and of our end, one at a time
        self._paused_until = 0.0  # injected faults (monotonic deadlines)
        self._cut_until = 0.0
        self.swap_ms = 0.0
        self._outboxes: dict[str, DataOutbox] = {}  # used by the data thread only
        self._busy = False  # a frame taken from the inbox and not yet sent
        self._last_ms = 0.0  # the compute time of the last frame run
        self._last_chained = False  # ...and whether it ran on chained block engines
        self._sample_shapes = [tuple(c.shape[1:]) for c in self.manifest.cut_points]
        self._normalise = Normaliser(self.manifest.preprocessing)
        self._prefix = fr.node_prefix(settings.name)
        self.replay = ReplayGuard(require=settings.key is not None)
        self._beat_stamps = Stamper()  # this node's own session, for its heartbeats
        self.neighbours = Neighbours(settings.name, settings.key, settings.tls,
                                     settings.stabilise_ms)
        self.join_refused: str | None = None  # why a join was refused (the node then stops)
        self._suspects: dict[str, float] = {}  # successor -> passed over until (data thread)
        # The last frames sent to each successor (data thread): when one is found dead they
        # go again to the next, as they may have died with it (in its buffers or NNG's).
        self._retained: dict[str, deque[fr.Frame]] = {}
        self._dead_epoch = 0
        self._resend_at = 0.0  # when to send the retained frames again (0: not due)
        self._finish_logged = -1  # the dead_epoch of the last "running it here" log line

    # ----------------------------------------------------------------- lifecycle
    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set. Binds both sockets first, so errors surface here."""
        self._stop = stop
        if self.settings.cpus:
            os.sched_setaffinity(0, set(self.settings.cpus))
        inbox = DataInbox(self.settings.data_addr, max_bytes=self.settings.max_frame_bytes,
                          recv_buffer=self.settings.queue_depth, tls=self.settings.tls)
        try:
            control = ControlServer(self.settings.control_addr, max_bytes=1 << 20,
                                    key=self.settings.key, tls=self.settings.tls)
        except BaseException:
            inbox.close()
            raise
        threads = [
            threading.Thread(target=self._data_loop, args=(inbox, stop), name="data"),
            threading.Thread(target=self._control_loop, args=(control, stop), name="control"),
            threading.Thread(target=self._heartbeat_loop, args=(stop,), name="heartbeat"),
            threading.Thread(target=self.neighbours.run, name="stabilise", args=(
                stop, lambda: time.monotonic() < self._paused_until)),
        ]
        if not self.settings.emulate:
            self.engines.warm_blocks()
        log.info("%s: serving %s (%d blocks) on %s, control %s", self.settings.name,
                 self.manifest.model_id, self.blocks, self.settings.data_addr,
                 self.settings.control_addr)
        for thread in threads:
            thread.start()
        try:
            if self.settings.join_addr is not None:
                self._join(self.settings.join_addr, stop)
            while not stop.wait(0.5):
                if self.settings.parent_pid and os.getppid() != self.settings.parent_pid:
                    log.warning("%s: the process that started this node is gone; stopping",
                                self.settings.name)
                    stop.set()
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=5)
            inbox.close()
            control.close()
            for box in self._outboxes.values():
                box.close()
            if self._left is not None:
                self._left.close()
            if self._fused_builds is not None:
                self._fused_builds.close()
            self.engines.close()
            self.repository.close()

    # ----------------------------------------------------------------- control
    def _control_loop(self, control: ControlServer, stop: threading.Event) -> None:
        while not stop.is_set():
            pause = self._paused_until - time.monotonic()
            if pause > 0:  # paused: no answers either
                stop.wait(min(pause, POLL_MS / 1000))
                continue
            try:
                control.serve_once(lambda m: self.handle_control(m, stop), timeout_ms=POLL_MS)
            except Exception as exc:  # the requester got an Ack(ok=False); keep serving
                if not stop.is_set():
                    log.warning("%s: control message failed: %s", self.settings.name, exc)

    def handle_control(self, message: msg.ControlMessage,
                       stop: threading.Event) -> msg.ControlMessage:
        if isinstance(message, msg.Hello):
            ok = message.fingerprint == self.manifest.fingerprint
            reason = "" if ok else (
                f"{self.settings.name} serves {self.manifest.model_id} fingerprint "
                f"{self.manifest.fingerprint[:12]}, the source has {message.fingerprint[:12]} "
                f"({message.model_id}); ship the source's model here: armdi pack on the "
                "source, armdi unpack on this node")
            return msg.HelloReply(node=self.settings.name, fingerprint=self.manifest.fingerprint,
                                  ok=ok, reason=reason)
        if isinstance(message, msg.Configure):
            return self._configure(message)
        if isinstance(message, msg.Stabilise):
            return self.neighbours.answer(message)
        if isinstance(message, msg.Join):
            return self._forward_join(message)
        if isinstance(message, msg.MoveBoundary):
            return self._move_end(message)
        if isinstance(message, msg.Fault):
            return self._fault(message)
        if isinstance(message, msg.SetSlowdown):
            log.info("%s: slowdown %.3g -> %.3g", self.settings.name, self.slowdown,
                     message.factor)
            self.slowdown = message.factor
            return msg.Ack(ok=True, reason="")
        if isinstance(message, msg.StatusRequest):
            return self.status()
        if isinstance(message, msg.Shutdown):
            log.info("%s: shutdown requested (%s)", self.settings.name, message.reason)
            stop.set()
            return msg.Ack(ok=True, reason="")
        return msg.Ack(ok=False, reason=f"unexpected message {type(message).__name__}")

    def _configure(self, m: msg.Configure) -> msg.Ack:
        if not 0 <= m.start <= m.end <= self.blocks:
            return msg.Ack(ok=False, reason=f"bad range [{m.start}, {m.end}) for "
                                            f"{self.blocks} blocks")
        try:
            if m.start < m.end and not self.settings.emulate:
                # runnable at once (chained block engines, opened and verified); the fused
                # engine loads in the background: a re-route must not wait for it
                self.engines.get(m.start, m.end)
        except ArmdiError as exc:
            return msg.Ack(ok=False, reason=str(exc))
        left = None
        if m.adaptive and m.predecessor and m.predecessor_control_addr and m.start < m.end:
            left = LeftBoundary(self.settings.name, self.settings.key, self._block_ms,
                                self.manifest.activation_bytes(), m, self.settings.controller,
                                prepare=self._prepare, lock=self._move_lock,
                                current_end=lambda: self.assignment.end,
                                committed=self._start_committed, tls=self.settings.tls)
        if m.session is not None:  # frames of this source run only, from now on
            self.replay.expect(bytes.fromhex(m.session))
            if m.session != self._session:  # a new source run numbers its requests afresh
                self._session = m.session
                self._attempts = OrderedDict()
        with self._lock:
            old, self._left = self._left, left
            self.assignment = Assignment(m.start, m.end, m.successor_addr or None,
                                         m.result_addr or None, m.wire_dtype, tuple(m.chain))
            self._start_seen = None
        self.neighbours.configure(m)
        self._suspects = {}
        self._retained = {}  # the source re-routed: it replays what was in flight
        if old is not None:
            old.close()
        self._preload(m.start, m.end)
        log.info("%s: runs blocks [%d, %d), forwards to %s%s", self.settings.name, m.start,
                 m.end, m.successor_addr or m.result_addr,
                 f"; moves the boundary with {m.predecessor}" if left else "")
        return msg.Ack(ok=True, reason="")

    # ----------------------------------------------------------------- joins
    def _member_info(self) -> msg.MemberInfo:
        return msg.MemberInfo(name=self.settings.name, data_addr=self.settings.data_addr,
                              control_addr=self.settings.control_addr)

    def _join(self, addr: str, stop: threading.Event) -> None:
        """Ask to join through ``addr`` (any member: a worker forwards it to the source),
        again every second until it is admitted; a refusal (another model version, a name
        taken) stops the node with the reason."""
        join = msg.Join(member=self._member_info(), fingerprint=self.manifest.fingerprint,
                        model_id=self.manifest.model_id, pid=os.getpid(), hops=0)
        with ControlClient(addr, key=self.settings.key, tls=self.settings.tls) as client:
            while not stop.is_set():
                try:
                    reply = client.request(join, timeout_ms=5000)
                except ArmdiError as exc:
                    log.warning("%s: join through %s: %s; trying again", self.settings.name,
                                addr, exc)
                    stop.wait(1.0)
                    continue
                if isinstance(reply, msg.Ack) and reply.ok:
                    log.info("%s: joined through %s (%s)", self.settings.name, addr,
                             reply.reason)
                    return
                reason = getattr(reply, "reason", repr(reply))
                if isinstance(reply, msg.Ack) and reply.reason.startswith(JOIN_RETRY):
                    stop.wait(1.0)
                    continue
                self.join_refused = reason
                log.error("%s: join refused: %s", self.settings.name, reason)
                stop.set()
                return

    def _forward_join(self, m: msg.Join) -> msg.Ack:
        """A joiner asked us: pass it on towards the source (the data owner admits joins)."""
        anchor = self.neighbours.anchor
        if anchor is None:
            return msg.Ack(ok=False, reason=f"{JOIN_RETRY}: {self.settings.name} is not a member "
                                            "of a running chain yet")
        if m.hops >= MAX_JOIN_HOPS:
            return msg.Ack(ok=False, reason=f"join of {m.member.name} forwarded {m.hops} times; "
                                            "giving up (a forwarding loop?)")
        log.info("%s: forwarding the join of %s to the source", self.settings.name,
                 m.member.name)
        fwd = m.model_copy(update={"hops": m.hops + 1})
        try:
            with ControlClient(anchor, key=self.settings.key, tls=self.settings.tls) as client:
                reply = client.request(fwd, timeout_ms=4000)
        except ArmdiError as exc:
            return msg.Ack(ok=False, reason=f"{JOIN_RETRY}: the source at {anchor} did not "
                                            f"answer ({exc})")
        if isinstance(reply, msg.Ack):
            return reply
        return msg.Ack(ok=False, reason=f"unexpected reply {type(reply).__name__}")

    def _fault(self, m: msg.Fault) -> msg.Ack:
        """Injected faults (tests, demos): see ``messages.Fault``."""
        now = time.monotonic()
        log.warning("%s: fault injected: %s %.3g s", self.settings.name, m.action, m.seconds)
        if m.action == "kill":  # exit as abruptly as kill -9, once the Ack is on its way
            threading.Timer(0.05, os._exit, args=(137,)).start()
        elif m.action == "pause":
            self._paused_until = now + m.seconds
        elif m.action == "cut":
            self._cut_until = now + m.seconds
        else:
            self._cut_until = self._paused_until = 0.0
        return msg.Ack(ok=True, reason="")

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        """A HEARTBEAT frame to the source every ``heartbeat_ms``, whatever the engine does
        (slow is not dead); none while paused or cut."""
        box: DataOutbox | None = None
        addr: str | None = None
        seq = 0
        period = self.settings.heartbeat_ms / 1000
        try:
            while not stop.wait(period):
                self._poll_fused_builds()
                target = self.assignment.result_addr
                now = time.monotonic()
                if target is None or now < self._paused_until or now < self._cut_until:
                    continue
                if target != addr:
                    if box is not None:
                        box.close()
                    box, addr = DataOutbox(target, send_buffer=4, tls=self.settings.tls), target
                seq += 1
                beat = fr.Frame(kind=fr.FrameKind.HEARTBEAT, request_id=seq, attempt=0,
                                fingerprint=self.fingerprint, start_block=0,
                                tensor=np.zeros(0, np.float32),
                                trace=(fr.TraceEntry(self.settings.name, 0, 0, 0.0),),
                                ext=self._beat_stamps.next())  # a replayed beat is dropped
                assert box is not None
                with contextlib.suppress(TransportError):  # the source is away: next beat
                    box.send_frame(fr.frame_parts(beat, self.settings.key), timeout_ms=0)
        finally:
            if box is not None:
                box.close()

    def _poll_fused_builds(self) -> None:
        builds = self._fused_builds
        if builds is None:
            return
        builds.set_busy(self._busy)
        try:
            if builds.poll():
                self.engines.reload(self.repository.load_manifest(self.settings.model_id))
        except Exception as exc:  # a failed background build: the range stays chained
            log.warning("%s: background engine build: %s", self.settings.name, exc)

    def _start_committed(self, boundary: int) -> None:
        """Our predecessor now ends at ``boundary``: it is our start from here on."""
        with self._lock:
            self._start_seen = boundary

    def _move_end(self, m: msg.MoveBoundary) -> msg.Ack:
        """Our successor moves the boundary between us: end our range at ``m.boundary``.
        Never while we move our own start (the same lock): each checks the other's result."""
        with self._move_lock:
            return self._move_end_locked(m)

    def _move_end_locked(self, m: msg.MoveBoundary) -> msg.Ack:
        with self._lock:
            a = self.assignment
            start = a.start if self._start_seen is None else self._start_seen
            if a.successor is None or not start < m.boundary < self.blocks:
                return msg.Ack(ok=False, reason=f"{self.settings.name} runs [{start}, {a.end}) "
                               f"and cannot end at {m.boundary}")
        received = time.perf_counter()
        try:  # the fused engine of the new range first: the old range serves meanwhile
            self._prepare(start, m.boundary)
        except ArmdiError as exc:
            return msg.Ack(ok=False, reason=str(exc))
        with self._lock:
            self.assignment = replace(self.assignment, end=m.boundary)
            self._move_at = (m.boundary, received)
        log.info("%s: now ends at block %d (was %d), asked by %s", self.settings.name,
                 m.boundary, a.end, m.node)
        self._preload(start, m.boundary)
        return msg.Ack(ok=True, reason="")

    def _prepare(self, start: int, end: int) -> None:
        if start < end and not self.settings.emulate:
            self.engines.load_now(start, end)

    def _preload(self, start: int, end: int) -> None:
        """Load the fused engines of the ranges a boundary move is likely to give next."""
        if start < end and not self.settings.emulate:
            self.engines.preload([(start, end), (start, end - 1), (start, end + 1),
                                  (start - 1, end), (start + 1, end)])

    def status(self) -> msg.NodeStatus:
        with self._lock:
            a = self.assignment
            start = a.start if self._start_seen is None else self._start_seen
            left = self._left
        return msg.NodeStatus(
            node=self.settings.name, start=min(start, a.end), end=a.end,
            queue_depth=int(self._busy), queue_capacity=self.settings.queue_depth,
            processed=self.stats.processed, dropped=dict(self.stats.dropped),
            compute_ms_ewma=self.stats.compute_ms or 0.0,
            send_ms_ewma=self.stats.send_ms or 0.0,
            uptime_s=time.monotonic() - self.started, slowdown=self.slowdown,
            speed=self._speed or 0.0, link_Bps=self._link_Bps or 0.0,
            moves=left.moves if left else 0, last_move=left.last_move if left else "",
            swap_ms=self.swap_ms, fused_load_ms=self.engines.last_load_ms, pid=os.getpid(),
            failovers=self.stats.failovers, resent=self.stats.resent,
            successors=self.neighbours.successor_names(),
        )

    # ----------------------------------------------------------------- data path
    def _drop(self, reason: str, detail: str) -> None:
        self.stats.dropped[reason] += 1
        log.warning("%s: dropped a frame (%s): %s", self.settings.name, reason, detail)

    def _data_loop(self, inbox: DataInbox, stop: threading.Event) -> None:
        """Receive, check, compute, send: one frame at a time, on this thread only."""
        while not stop.is_set():
            pause = self._paused_until - time.monotonic()
            if pause > 0:  # an injected pause: frames wait in NNG's buffers meanwhile
                stop.wait(min(pause, POLL_MS / 1000))
                continue
            if self.neighbours.dead_epoch != self._dead_epoch:
                self._dead_epoch = self.neighbours.dead_epoch
                self._resend_at = time.monotonic() + RESEND_GRACE_S
            if self._resend_at and time.monotonic() >= self._resend_at:
                self._resend_at = 0.0
                self._resend_retained()
            try:
                buf = inbox.recv(timeout_ms=POLL_MS)
            except TransportTimeout:
                continue  # look at ``stop`` again
            except TransportClosed:
                return
            except TransportError as exc:
                log.warning("%s: receive failed: %s", self.settings.name, exc)
                continue
            try:
                self.handle(buf, time.monotonic())
            except Exception as exc:  # a bug: never let it end the data loop
                self._drop("internal_error", f"handling a frame: {exc!r}")
            finally:
                self._busy = False

    def handle(self, buf: memoryview, arrived: float | None = None) -> None:
        """Decode and check one received frame (``arrived``: when, ``time.monotonic()``),
        run it, and send the outcome on."""
        if arrived is None:
            arrived = time.monotonic()
        try:
            frame = fr.decode_frame(buf, key=self.settings.key,
                                    max_bytes=self.settings.max_frame_bytes)
            self.check_frame(frame)
            if self.settings.key is not None:  # without a key anyone may forge a frame:
                self.replay.check(frame, buf, tagged=True)  # a replay check stops nothing
        except fr.FrameError as exc:
            self._drop(exc.reason, str(exc))
            return
        if self._unwanted(frame, arrived):
            return
        self._busy = True
        a = self.assignment  # replaced whole by Configure: one consistent read
        if frame.start_block >= a.end:  # our range moved past it: it needs none of ours
            self.stats.passed += 1
            if not self._send_one(frame, a, arrived):
                self._finish_here(frame, a, arrived)
            return
        try:
            out = self.compute(frame, a.end, a.wire_dtype)
            left = self._left
            if left is not None and not self._last_chained:  # a chain's time misleads
                left.observe(frame, a.end, self._last_ms)
        except Exception as exc:  # tell the source at once: a re-send would fail again
            self._drop("engine_error", str(exc))
            hop = fr.hop_wire(self._prefix, frame.start_block, max(a.end, frame.start_block),
                              0.0)
            out = frame.forward(fr.FrameKind.ERROR, frame.start_block, np.zeros(0, np.float32),
                                hop, error=f"{type(exc).__name__}: {exc}")
        if not self._send_one(out, a, arrived):
            self._finish_here(out, a, arrived)

    def _finish_here(self, frame: fr.Frame, a: Assignment, arrived: float) -> None:
        """No successor takes frames any more (all found dead): run the rest of the model
        here (chained block engines) and send the result to the source, rather than lose
        a frame this node holds. The source re-places the boundaries soon after."""
        self.stats.finished_here += 1
        self.stats.failovers += 1
        if self._finish_logged != self.neighbours.dead_epoch:  # once per death, not per frame
            self._finish_logged = self.neighbours.dead_epoch
            log.warning("%s: no live successor; running blocks [%d, %d) here until the "
                        "source re-routes", self.settings.name, frame.start_block, self.blocks)
        try:
            out = self.compute(frame, self.blocks, a.wire_dtype)
        except Exception as exc:
            self._drop("engine_error", str(exc))
            hop = fr.hop_wire(self._prefix, frame.start_block, self.blocks, 0.0)
            out = frame.forward(fr.FrameKind.ERROR, frame.start_block, np.zeros(0, np.float32),
                                hop, error=f"{type(exc).__name__}: {exc}")
        self._send_one(out, a, arrived)

    def _unwanted(self, frame: fr.Frame, arrived: float) -> bool:
        """Drop (and count) a frame whose work is no longer wanted: an older attempt of a
        request this node has seen a newer attempt of (``superseded``: the source re-sent
        it), or one whose attempt's budget ran out while it waited here (``expired``)."""
        rid, attempt = frame.request_id, frame.attempt
        attempts = self._attempts
        seen = attempts.get(rid)
        if seen is None or attempt > seen:
            attempts[rid] = attempt
            if len(attempts) > SEEN_ATTEMPTS:
                attempts.popitem(last=False)
        elif attempt < seen:
            self.stats.dropped["superseded"] += 1
            return True
        budget = frame_ext.budget_ms(frame.ext)
        if budget is not None and (time.monotonic() - arrived) * 1000 >= budget:
            self.stats.dropped["expired"] += 1
            return True
        return False

    def check_frame(self, frame: fr.Frame) -> None:
        """Raise ``FrameError`` unless this node can run this frame."""
        if frame.kind != fr.FrameKind.ACTIVATION:
            raise FrameRejected("wrong_kind", f"unexpected {frame.kind.name} frame")
        if frame.fingerprint != self.fingerprint:
            raise FrameRejected(
                "wrong_fingerprint",
                f"frame for model fingerprint {frame.fingerprint.hex()[:12]}, this node serves "
                f"{self.manifest.fingerprint[:12]}")
        a = self.assignment
        if not 0 <= frame.start_block < self.blocks or (
                frame.start_block >= a.end and a.successor is None):
            raise FrameRejected("wrong_blocks", f"frame starts at block {frame.start_block}; "
                                f"this node runs blocks up to {a.end} of {self.blocks}")
        if frame.start_block == 0 and frame_ext.has_record(frame.ext, frame_ext.ENCODED_TYPE):
            if frame.tensor.dtype != np.uint8 or frame.tensor.ndim != 2:
                raise FrameRejected("wrong_shape", "an encoded image must be a uint8 row "
                                    f"(1, n), got {frame.tensor.dtype} "
                                    f"{tuple(frame.tensor.shape)}")
            return  # decoded (and checked) where it runs: compute
        expected = self._sample_shapes[frame.start_block]
        if tuple(frame.tensor.shape[1:]) != expected or frame.tensor.ndim != len(expected) + 1:
            raise FrameRejected("wrong_shape", f"activation shape {tuple(frame.tensor.shape)} "
                                f"does not match cut point {frame.start_block} "
                                f"{('N', *expected)}")
        dtype = frame.tensor.dtype
        if not (dtype == np.float32 or dtype == np.float16
                or (dtype == np.uint8 and frame.start_block == 0)):
            raise FrameRejected("wrong_dtype", f"activation dtype {dtype} is not float32/"
                                "float16 (or uint8 pixels, for block 0)")

    def compute(self, frame: fr.Frame, end: int,
                wire_dtype: fr.WireDtype = "float32") -> fr.Frame:
        """Run ``[frame.start_block, end)`` on the frame's activation (slowdown included);
        the frame it returns carries an activation as ``wire_dtype``.

        uint8 pixels (an image request at block 0) are normalised here, on the node that
        runs the first block: a quarter of float32's bytes crossed the link. An encoded image
        (``ddi_input = "jpeg"``: the frame's ENCODED record) is decoded, resized and cropped
        here first, as the source does for other modes (the decode is really done, also
        under emulated compute)."""
        t0 = time.perf_counter()
        start = frame.start_block
        x = frame.tensor
        if start == 0 and frame_ext.has_record(frame.ext, frame_ext.ENCODED_TYPE):
            x = pixels(decode_image(x.tobytes()), self.manifest.preprocessing)
        profiled = self._profiled_ms(start, end)
        if self.settings.emulate:  # emulated compute: the blocks' profiled times, zeros out
            wait_ms = self._emulated_ms.get((start, end))  # a fused segment's measured time
            if wait_ms is None:
                wait_ms = sum(self._block_ms[start:end])  # as the allocator models a segment
            self._stop.wait(wait_ms * self.settings.emulate_scale * self.slowdown / 1000)
            shape = (x.shape[0], *self._sample_shapes[end])
            y = np.zeros(shape, np.float32)
        else:
            x = self._normalise(x) if x.dtype == np.uint8 else fr.to_compute_dtype(x)
            engine = self.engines.get(start, end)
            self._last_chained = self.engines.provisional(engine)
            y = engine.infer(x)
            if self.slowdown > 1.0:  # emulation: really compute, then wait the rest
                self._stop.wait((time.perf_counter() - t0) * (self.slowdown - 1.0))
        now = time.perf_counter()
        ms = self._last_ms = (now - t0) * 1000
        self.stats.processed += 1
        if profiled > 0:
            speed = ms / profiled
            if self._speed is not None:  # one frame held up (the process stopped, swapped
                speed = min(speed, SPEED_STEP * self._speed)  # out) moves it a step at most
            self._speed = speed if self._speed is None else self._speed + 0.2 * (
                speed - self._speed)
            ms = min(ms, speed * profiled)
        self.stats.observe("compute_ms", ms)
        if self._move_at is not None and self._move_at[0] == end:  # first frame after a move
            self.swap_ms = (now - self._move_at[1]) * 1000
            self._move_at = None
        if end == self.blocks:
            kind = fr.FrameKind.RESULT
        else:
            kind, y = fr.FrameKind.ACTIVATION, fr.cast_for_wire(y, wire_dtype)
        return frame.forward(kind, end, y, fr.hop_wire(self._prefix, frame.start_block, end, ms))

    def _profiled_ms(self, start: int, end: int) -> float:
        fused = self._segment_ms.get(f"{start}:{end}")
        return fused if fused is not None else sum(self._block_ms[start:end])

    def _outbox(self, addr: str) -> DataOutbox:
        box = self._outboxes.get(addr)
        if box is None:
            box = self._outboxes[addr] = DataOutbox(addr, send_buffer=self.settings.queue_depth,
                                                    rate_Bps=self.settings.link_Bps,
                                                    delay_s=self.settings.link_delay_s,
                                                    tls=self.settings.tls)
        return box

    def _send_one(self, frame: fr.Frame, a: Assignment, arrived: float | None = None) -> bool:
        """Encode and send one frame to where it goes next; failures are counted. False only
        when an activation has no live successor left (the caller then runs it to the end).

        Returns once the frame is in NNG's send buffer (NNG writes it out on its own
        thread); blocks only while that buffer is full. While it waits it follows re-routes:
        every ``SEND_SLICE_MS`` it looks again where frames go now, so a successor that
        stabilisation found dead (or the source re-routed around) is left behind at once.
        A member whose send times out (``send_timeout_ms``) is passed over for a while too:
        the frame goes to the next live successor, which runs the blocks it still needs."""
        now = time.monotonic()
        if now < self._cut_until:
            self.stats.dropped["link_cut"] += 1  # an injected cut: nothing leaves
            return True
        if arrived is not None and frame.kind != fr.FrameKind.ERROR:
            budget = frame_ext.budget_ms(frame.ext)
            if budget is not None:  # what is left of it once the frame leaves here
                left = budget - (now - arrived) * 1000
                if left <= 0:
                    self.stats.dropped["expired"] += 1
                    return True
                frame = frame.with_ext(frame_ext.with_budget(frame.ext, left))
        parts = fr.frame_parts(frame, self.settings.key)
        t0 = time.perf_counter()
        deadline = t0 + self.settings.send_timeout_ms / 1000
        activation = frame.kind == fr.FrameKind.ACTIVATION
        while True:
            a = self.assignment
            target = self._next_hop() if activation and self.neighbours.member else None
            if activation and self.neighbours.member and target is None:
                return False
            addr = target.data_addr if target is not None else (
                a.successor if activation else a.result_addr)
            if addr is None:
                self._drop("no_route", f"no successor configured for block "
                                       f"{frame.start_block}")
                return True
            try:
                self._outbox(addr).send_frame(parts, timeout_ms=SEND_SLICE_MS)
                break
            except TransportTimeout as exc:
                if self._stop.is_set():
                    self._drop("send_failed", f"to {addr}: {exc}")
                    return True
                if time.perf_counter() >= deadline:
                    if target is None:
                        self._drop("send_failed", f"to {addr}: {exc}")
                        return True
                    log.warning("%s: send to %s timed out; passing it over", self.settings.name,
                                target.name)
                    self._suspects[target.name] = time.monotonic() + SUSPECT_S
                    deadline = time.perf_counter() + self.settings.send_timeout_ms / 1000
            except TransportError as exc:
                # The source re-sends overdue requests; this node only reports and moves on.
                self._drop("send_failed", f"to {addr}: {exc}")
                return True
        if activation and addr != a.successor:
            self.stats.failovers += 1  # past the successor the source configured
        if target is not None:
            kept = self._retained.get(target.name)
            if kept is None:
                kept = self._retained[target.name] = deque(maxlen=3 * self.settings.queue_depth
                                                           + 2)
            kept.append(frame)
        send_s = time.perf_counter() - t0
        self.stats.observe("send_ms", send_s * 1000)
        if send_s > 0:
            head, payload, tag = parts
            rate = (len(head) + (0 if payload is None else payload.nbytes) + len(tag)) / send_s
            self._link_Bps = rate if self._link_Bps is None else self._link_Bps + 0.2 * (
                rate - self._link_Bps)
        return True

    def _resend_retained(self) -> None:
        """Successors were found dead ``RESEND_GRACE_S`` ago and the source has not
        re-routed since (its re-route replays every request in flight, and clears these):
        the frames last sent to them may have died with them (in NNG's send buffer, in
        theirs), so send them again past them. A copy that was not lost after all ends as a
        duplicate result, which the source drops."""
        a = self.assignment
        for name in sorted(self.neighbours.dead()):
            frames = self._retained.pop(name, None)
            if not frames:
                continue
            log.warning("%s: sending the last %d frames sent to %s again, past it",
                        self.settings.name, len(frames), name)
            for frame in frames:
                self.stats.resent += 1
                if not self._send_one(frame, a):
                    self._finish_here(frame, a, time.monotonic())

    def _next_hop(self) -> Member | None:
        """The nearest successor that stabilisation did not find dead and whose sends did
        not time out lately (data thread only)."""
        now = time.monotonic()
        if self._suspects:
            self._suspects = {n: t for n, t in self._suspects.items() if t > now}
            target = self.neighbours.next_hop(frozenset(self._suspects))
            if target is not None:
                return target  # (else: all of them slow, none dead: wait on the nearest)
        return self.neighbours.next_hop()
