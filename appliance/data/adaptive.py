"""A worker's side of the AR-MDI controller: the boundary on its left, with its predecessor.

The data loop calls ``observe`` once per frame it runs (cheap: two appends), and every
``samples`` frames asks the pure ``propose`` for a move. A move is made from a thread of its
own, so the data loop never waits: it loads this node's fused engine for its new range, then
asks the predecessor (over its control socket) to end at the new boundary; the predecessor
loads its own new range's engine, then switches. Both keep serving their old ranges while
the engines load, and frames in flight stay correct (they say where they are).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

from appliance.control.controller import BoundaryController, ControllerSettings, Move, transfer_ms
from appliance.wire import frames as fr
from appliance.wire import messages as msg
from appliance.wire.transport import ControlClient, TlsFiles
from engines.errors import ArmdiError

log = logging.getLogger("armdi.adaptive")


class LeftBoundary:
    def __init__(self, node: str, key: bytes | None, block_ms: Sequence[float],
                 activation_bytes: Sequence[int], configure: msg.Configure,
                 settings: ControllerSettings,
                 prepare: Callable[[int, int], object] = lambda start, end: None,
                 lock: threading.Lock | None = None,
                 current_end: Callable[[], int] | None = None,
                 committed: Callable[[int], None] = lambda boundary: None,
                 tls: TlsFiles | None = None) -> None:
        assert configure.predecessor and configure.predecessor_control_addr
        self.node = node
        self.predecessor = configure.predecessor
        self.address = configure.predecessor_control_addr
        self.key = key
        self.tls = tls
        self.settings = settings
        self.prepare = prepare  # loads this node's engine for a range before a move
        # Moves of this node's two boundaries never interleave: the node's successor moving
        # our end takes the same lock, so each side checks the other's committed state.
        self.lock = lock or threading.Lock()
        self.current_end = current_end
        self.committed = committed
        self.controller = BoundaryController(block_ms, settings)
        self.left_transfer = transfer_ms(activation_bytes, configure.upstream_Bps,
                                         configure.upstream_latency_ms)
        self.right_transfer = transfer_ms(activation_bytes, configure.downstream_Bps,
                                          configure.downstream_latency_ms)
        self.blocks = len(block_ms)
        self.moves = 0
        self.last_move = ""
        self._pending = False
        self._queue: queue.Queue[tuple[Move, int, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._send_loop, name="mover", daemon=True)
        self._thread.start()

    def observe(self, frame: fr.Frame, end: int, ms: float) -> None:
        """A frame this node ran ``[frame.start_block, end)`` of, in ``ms``."""
        trace = frame.trace
        if not trace:
            return
        prev = trace[-1]
        if prev.node != self.predecessor or prev.end != frame.start_block:
            return  # not straight from the predecessor (a re-route, a pass-through)
        ctl = self.controller
        ctl.observe((prev.start, prev.end), prev.ms, (frame.start_block, end), ms)
        if self._pending or ctl.count % self.settings.samples:
            return
        last = self.right_transfer[end] if end < self.blocks else 0.0
        move = ctl.decide(self.left_transfer, last)
        if move is not None:
            self._pending = True
            self._queue.put((move, frame.start_block, end))

    def _send_loop(self) -> None:
        client = ControlClient(self.address, key=self.key, tls=self.tls)
        try:
            while (item := self._queue.get()) is not None:
                move, old, end = item
                why = move.describe(self.predecessor, self.node, old)
                ok = False
                try:
                    with self.lock:
                        end = self.current_end() if self.current_end else end
                        if not move.boundary < end:
                            continue  # our own end moved meanwhile: judge afresh (finally)
                        self.prepare(move.boundary, end)  # our side's fused engine first
                        reply = client.request(msg.MoveBoundary(node=self.node,
                                                                boundary=move.boundary,
                                                                reason=why), timeout_ms=30_000)
                        ok = isinstance(reply, msg.Ack) and reply.ok
                        if ok:
                            self.committed(move.boundary)
                    if ok:
                        self.moves += 1
                        self.last_move = why
                        log.info("%s: moved %s", self.node, why)
                    else:
                        log.warning("%s: %s refused boundary %d: %s", self.node,
                                    self.predecessor, move.boundary,
                                    getattr(reply, "reason", reply))
                except ArmdiError as exc:
                    log.warning("%s: could not move the boundary with %s: %s", self.node,
                                self.predecessor, exc)
                finally:
                    if ok:
                        self.controller.moved()  # dwell before the next move
                    else:  # stale (a range changed meanwhile) or failed: nothing moved
                        self.controller.refused()
                    self._pending = False
        finally:
            client.close()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
