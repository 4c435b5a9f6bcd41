"""A worker node: receive activation frames, run ``[start_block, end)``, forward.

Three threads overlap the work of one node: the receive loop decodes and checks frames and
puts them on a bounded queue (a full queue stops receiving, which pushes back on the sender);
the compute loop runs the engine; the send loop encodes and ships. A fourth thread answers
control messages. Every blocking call has a timeout, so ``stop`` ends all of them promptly.
A bad frame is counted, logged and dropped; it never stops the node.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance import frames as fr
from appliance import messages as msg
from appliance.transport import ControlServer, DataInbox, DataOutbox, TransportError
from engines.base import Engine
from engines.errors import ArmdiError
from engines.manifest import Manifest
from engines.repository import ModelRepository

log = logging.getLogger("armdi.node")

POLL_MS = 200


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
    queue_depth: int = 8
    send_timeout_ms: int = 2000
    engine_cache: int = 8
    parent_pid: int | None = None  # stop when this process is gone (armdi up's workers)


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
    dropped: Counter[str] = field(default_factory=Counter)
    compute_ms: float | None = None
    send_ms: float | None = None

    def observe(self, attr: str, value: float, alpha: float = 0.2) -> None:
        old = getattr(self, attr)
        setattr(self, attr, value if old is None else (1 - alpha) * old + alpha * value)


class Node:
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
        self._engine_lock = threading.Lock()  # the control and compute threads open engines
        self._send_lock = threading.Lock()  # one sender at a time: send or compute thread
        self._stop = threading.Event()
        self._engines: OrderedDict[tuple[int, int], Engine] = OrderedDict()
        self._inbox_q: queue.Queue[fr.Frame] = queue.Queue(settings.queue_depth)
        self._send_q: queue.Queue[fr.Frame] = queue.Queue(settings.queue_depth)
        self._outboxes: dict[str, DataOutbox] = {}
        self._sample_shapes = [tuple(c.shape[1:]) for c in self.manifest.cut_points]

    # ----------------------------------------------------------------- lifecycle
    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set. Binds both sockets first, so errors surface here."""
        self._stop = stop
        if self.settings.cpus:
            os.sched_setaffinity(0, set(self.settings.cpus))
        inbox = DataInbox(self.settings.data_addr, max_bytes=self.settings.max_frame_bytes)
        try:
            control = ControlServer(self.settings.control_addr,
                                    max_bytes=1 << 20, key=self.settings.key)
        except BaseException:
            inbox.close()
            raise
        threads = [
            threading.Thread(target=self._recv_loop, args=(inbox, stop), name="recv"),
            threading.Thread(target=self._compute_loop, args=(stop,), name="compute"),
            threading.Thread(target=self._send_loop, args=(stop,), name="send"),
            threading.Thread(target=self._control_loop, args=(control, stop), name="control"),
        ]
        log.info("%s: serving %s (%d blocks) on %s, control %s", self.settings.name,
                 self.manifest.model_id, self.blocks, self.settings.data_addr,
                 self.settings.control_addr)
        for thread in threads:
            thread.start()
        try:
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
            with self._engine_lock:
                for engine in self._engines.values():
                    engine.close()
                self._engines.clear()
            self.repository.close()

    # ----------------------------------------------------------------- control
    def _control_loop(self, control: ControlServer, stop: threading.Event) -> None:
        while not stop.is_set():
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
            if m.start < m.end:
                self._engine(m.start, m.end)  # load (and verify) before taking traffic
        except ArmdiError as exc:
            return msg.Ack(ok=False, reason=str(exc))
        with self._lock:
            self.assignment = Assignment(m.start, m.end, m.successor_addr or None,
                                         m.result_addr or None, m.wire_dtype, tuple(m.chain))
        log.info("%s: runs blocks [%d, %d), forwards to %s", self.settings.name, m.start, m.end,
                 m.successor_addr or m.result_addr)
        return msg.Ack(ok=True, reason="")

    def status(self) -> msg.NodeStatus:
        with self._lock:
            a = self.assignment
        return msg.NodeStatus(
            node=self.settings.name, start=a.start, end=a.end,
            queue_depth=self._inbox_q.qsize(), queue_capacity=self.settings.queue_depth,
            processed=self.stats.processed, dropped=dict(self.stats.dropped),
            compute_ms_ewma=self.stats.compute_ms or 0.0,
            send_ms_ewma=self.stats.send_ms or 0.0,
            uptime_s=time.monotonic() - self.started,
        )

    # ----------------------------------------------------------------- data path
    def _drop(self, reason: str, detail: str) -> None:
        self.stats.dropped[reason] += 1
        log.warning("%s: dropped a frame (%s): %s", self.settings.name, reason, detail)

    def _recv_loop(self, inbox: DataInbox, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                buf = inbox.recv(timeout_ms=POLL_MS)
            except TransportError:
                continue  # a timeout: look at ``stop`` again
            try:
                frame = fr.decode_frame(buf, key=self.settings.key,
                                        max_bytes=self.settings.max_frame_bytes)
                self.check_frame(frame)
            except fr.FrameError as exc:
                self._drop(exc.reason, str(exc))
                continue
            except Exception as exc:  # a bug: never let it end the receive loop
                self._drop("internal_error", f"decoding a frame: {exc!r}")
                continue
            while not stop.is_set():
                try:
                    self._inbox_q.put(frame, timeout=POLL_MS / 1000)
                    break
                except queue.Full:
                    continue  # back-pressure: stop receiving until there is room

    def check_frame(self, frame: fr.Frame) -> None:
        """Raise ``FrameError`` unless this node can run this frame."""
        if frame.kind != fr.FrameKind.ACTIVATION:
            raise FrameRejected("wrong_kind", f"unexpected {frame.kind.name} frame")
        if frame.fingerprint != self.fingerprint:
            raise FrameRejected(
                "wrong_fingerprint",
                f"frame for model fingerprint {frame.fingerprint.hex()[:12]}, this node serves "
                f"{self.manifest.fingerprint[:12]}")
        with self._lock:
            end = self.assignment.end
        if not 0 <= frame.start_block < end:
            raise FrameRejected("wrong_blocks", f"frame starts at block {frame.start_block}; "
                                f"this node runs blocks up to {end} of {self.blocks}")
        expected = self._sample_shapes[frame.start_block]
        if tuple(frame.tensor.shape[1:]) != expected or frame.tensor.ndim != len(expected) + 1:
            raise FrameRejected("wrong_shape", f"activation shape {tuple(frame.tensor.shape)} "
                                f"does not match cut point {frame.start_block} "
                                f"{('N', *expected)}")
        if frame.tensor.dtype not in (np.float32, np.float16):
            raise FrameRejected("wrong_dtype", f"activation dtype {frame.tensor.dtype} is not "
                                "float32/float16")

    def _engine(self, start: int, end: int) -> Engine:
        """The engine of ``[start, end)``, from a small LRU cache (evicted engines are closed:
        a swapped-out TensorRT engine releases its GPU memory)."""
        key = (start, end)
        with self._engine_lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self.repository.open_engine(self.manifest, start, end,
                                                     backend=self.backend,
                                                     threads=self.settings.threads)
                self._engines[key] = engine
                while len(self._engines) > self.settings.engine_cache:
                    _, old = self._engines.popitem(last=False)
                    old.close()
            self._engines.move_to_end(key)
            return engine

    def _compute_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                frame = self._inbox_q.get(timeout=POLL_MS / 1000)
            except queue.Empty:
                continue
            with self._lock:
                end = self.assignment.end
            try:
                out = self.compute(frame, end)
            except Exception as exc:  # tell the source at once: a re-send would fail again
                self._drop("engine_error", str(exc))
                out = fr.Frame(kind=fr.FrameKind.ERROR, request_id=frame.request_id,
                               attempt=frame.attempt, fingerprint=frame.fingerprint,
                               start_block=frame.start_block,
                               tensor=np.zeros(0, np.float32),
                               trace=(*frame.trace, fr.TraceEntry(
                                   node=self.settings.name, start=frame.start_block,
                                   end=end, ms=0.0)),
                               error=f"{type(exc).__name__}: {exc}"[:1000])
            # Idle sender: ship it from here and save a thread hand-off (~0.1 ms); busy
            # sender: queue it, so sending overlaps the next computation.
            if self._send_q.empty() and self._send_lock.acquire(blocking=False):
                try:
                    self._send_one(out)
                finally:
                    self._send_lock.release()
                continue
            while not stop.is_set():
                try:
                    self._send_q.put(out, timeout=POLL_MS / 1000)
                    break
                except queue.Full:
                    continue

    def compute(self, frame: fr.Frame, end: int) -> fr.Frame:
        """Run ``[frame.start_block, end)`` on the frame's activation (slowdown included)."""
        t0 = time.perf_counter()
        x = fr.to_compute_dtype(frame.tensor)
        y = self._engine(frame.start_block, end).infer(x)
        compute_s = time.perf_counter() - t0
        if self.settings.slowdown > 1.0:  # emulation: really compute, then wait the rest
            self._stop.wait(compute_s * (self.settings.slowdown - 1.0))
        ms = (time.perf_counter() - t0) * 1000
        self.stats.observe("compute_ms", ms)
        self.stats.processed += 1
        hop = fr.TraceEntry(node=self.settings.name, start=frame.start_block, end=end, ms=ms)
        kind = fr.FrameKind.RESULT if end == self.blocks else fr.FrameKind.ACTIVATION
        return fr.Frame(kind=kind, request_id=frame.request_id, attempt=frame.attempt,
                        fingerprint=frame.fingerprint, start_block=end, tensor=y,
                        trace=(*frame.trace, hop))

    def _outbox(self, addr: str) -> DataOutbox:
        box = self._outboxes.get(addr)
        if box is None:
            box = self._outboxes[addr] = DataOutbox(addr)
        return box

    def _send_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                frame = self._send_q.get(timeout=POLL_MS / 1000)
            except queue.Empty:
                continue
            with self._send_lock:
                self._send_one(frame)

    def _send_one(self, frame: fr.Frame) -> None:
        """Encode and send one frame to where it goes next; failures are counted."""
        with self._lock:
            a = self.assignment
        addr = a.successor if frame.kind == fr.FrameKind.ACTIVATION else a.result_addr
        if addr is None:
            self._drop("no_route", f"no successor configured for block {frame.start_block}")
            return
        tensor = frame.tensor
        if frame.kind == fr.FrameKind.ACTIVATION:
            tensor = fr.cast_for_wire(tensor, a.wire_dtype)
        t0 = time.perf_counter()
        try:
            size, write = fr.frame_writer(_with_tensor(frame, tensor), self.settings.key)
            self._outbox(addr).send_with(size, write,
                                         timeout_ms=self.settings.send_timeout_ms)
        except TransportError as exc:
            # The source re-sends overdue requests; this node only reports and moves on.
            self._drop("send_failed", f"to {addr}: {exc}")
            return
        except Exception as exc:  # a bug: never let it end the send loop
            self._drop("internal_error", f"sending to {addr}: {exc!r}")
            return
        self.stats.observe("send_ms", (time.perf_counter() - t0) * 1000)


def _with_tensor(frame: fr.Frame, tensor: np.ndarray) -> fr.Frame:
    if tensor is frame.tensor:
        return frame
    return fr.Frame(kind=frame.kind, request_id=frame.request_id, attempt=frame.attempt,
                    fingerprint=frame.fingerprint, start_block=frame.start_block, tensor=tensor,
                    trace=frame.trace)
