"""A worker's side of membership: its view of the line, kept fresh by stabilisation.

``Neighbours`` holds the worker's predecessor and successor list (pure logic:
``appliance.control.membership``), takes the lists the source's ``Configure`` gives, answers
its predecessor's stabilisation pings, and runs its own stabilisation on a thread of its own
(never on the data loop): every ``stabilise_ms`` it pings its successors in order, nearest
first, until one answers (each gets two tries of ``stabilise_ms / 2``). One that has not
answered for ``DEAD_AFTER_S`` (1 s, or 5 rounds if longer) is *dead*, and the data path skips
it at once (``next_hop``): a control thread busy loading an engine for a new range (it
answers pings only between control messages) is not taken for dead, which would send
frames past a live worker. A killed successor is found within about 1.2 s; the source's
detector (~0.5 s) usually re-routes first, and this is the second line. A member found dead
that answers again is taken back (the source's list stays the authority until the source
re-configures).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from appliance.control import membership as mb
from appliance.wire import messages as msg
from appliance.wire.transport import ControlClient, TlsFiles
from engines.errors import ArmdiError

log = logging.getLogger("armdi.node")

DEAD_AFTER_S = 1.0  # silent this long (and at least 5 stabilisation rounds): dead


def to_member(m: msg.MemberInfo) -> mb.Member:
    return mb.Member(m.name, m.data_addr, m.control_addr, m.rank)


def to_info(m: mb.Member) -> msg.MemberInfo:
    return msg.MemberInfo(name=m.name, data_addr=m.data_addr, control_addr=m.control_addr,
                          rank=m.rank)


class Neighbours:
    """One worker's predecessor and next live successors (thread-safe)."""

    def __init__(self, name: str, key: bytes | None, tls: TlsFiles | None,
                 stabilise_ms: float, on_dead: Callable[[str], None] | None = None) -> None:
        self.name = name
        self._key, self._tls = key, tls
        self.stabilise_ms = stabilise_ms
        self._on_dead = on_dead
        self._lock = threading.Lock()
        self._view: mb.View | None = None  # None: not a member (edgepipe, or not configured)
        self._configured: tuple[mb.Member, ...] = ()  # the source's list: the authority
        self._r = mb.DEFAULT_SUCCESSORS
        self._dead: frozenset[str] = frozenset()
        self.dead_epoch = 0  # counts rounds that found a successor newly dead
        self.anchor: str | None = None  # the source's control address
        self._clients: dict[str, ControlClient] = {}  # used by the stabilisation thread only
        self._answered: dict[str, float] = {}  # successor -> when it last answered (or came)
        self.dead_after_s = max(DEAD_AFTER_S, 5 * stabilise_ms / 1000)
        self.rounds = 0
        self._epoch = 0  # counts Configures: a round that straddles one is thrown away

    # ------------------------------------------------------------------ from Configure
    def configure(self, m: msg.Configure) -> None:
        with self._lock:
            self._epoch += 1
            self.anchor = m.anchor_control_addr
            if m.me is None or m.start == m.end:  # an old source, or no blocks: no membership
                self._view, self._configured, self._dead = None, (), frozenset()
                return
            successors = tuple(to_member(s) for s in m.successors)
            self._r = max(1, len(successors))
            pred = to_member(m.predecessor_member) if m.predecessor_member else None
            self._view = mb.View(to_member(m.me), pred, successors)
            self._configured, self._dead = successors, frozenset()
            now = time.monotonic()
            self._answered = {s.name: now for s in successors}  # each gets its grace

    # ------------------------------------------------------------------ the data path
    @property
    def member(self) -> bool:
        return self._view is not None

    def next_hop(self, skip: frozenset[str] = frozenset()) -> mb.Member | None:
        """The nearest successor not found dead (nor in ``skip``); None: none is left."""
        view, dead = self._view, self._dead
        if view is None:
            return None
        return next((s for s in view.successors if s.name not in dead and s.name not in skip),
                    None)

    def dead(self) -> frozenset[str]:
        """The successors the last round found dead."""
        return self._dead

    def successor_names(self) -> tuple[str, ...]:
        view = self._view
        return tuple(s.name for s in view.successors) if view is not None else ()

    # ------------------------------------------------------------------ answering pings
    def answer(self, m: msg.Stabilise) -> msg.StabiliseReply:
        """A predecessor's ping (Chord's notify): take it as predecessor if nearer."""
        with self._lock:
            view = self._view
            if view is None:
                return msg.StabiliseReply(node=self.name)
            self._view = view = mb.notify(view, to_member(m.caller), self._dead)
        return msg.StabiliseReply(
            node=self.name, predecessor=to_info(view.predecessor) if view.predecessor else None,
            successors=tuple(to_info(s) for s in view.successors))

    # ------------------------------------------------------------------ stabilisation
    def run(self, stop: threading.Event, paused: Callable[[], bool]) -> None:
        period = self.stabilise_ms / 1000
        try:
            while not stop.wait(period):
                if paused():
                    continue
                try:
                    self.stabilise_once()
                except Exception as exc:  # a bug: log it, keep stabilising
                    log.warning("%s: stabilisation failed: %r", self.name, exc)
        finally:
            for client in self._clients.values():
                client.close()

    def stabilise_once(self) -> None:
        """Ping the successors nearest first until one answers; repair the list from its
        report (or from the anchor's when none answers)."""
        with self._lock:
            view = self._view
            configured = self._configured
            epoch = self._epoch
        if view is None:
            return
        # our list, with the source's members that answer again taken back
        base = mb.View(view.me, view.predecessor, mb.merge_successors(
            view.me, view.successors + configured, (), self._r + len(configured)))
        timeout_ms = max(50, int(self.stabilise_ms / 2))  # twice: silent for a stabilise_ms
        caller = msg.Stabilise(caller=to_info(view.me))
        dead: set[str] = set()
        report: mb.Report | None = None
        for s in base.successors:
            reply = self._ask(s.control_addr, caller, timeout_ms)
            if reply is None:  # once more
                reply = self._ask(s.control_addr, caller, timeout_ms)
            now = time.monotonic()
            if isinstance(reply, msg.StabiliseReply) and reply.node == s.name:
                self._answered[s.name] = now
                report = _report(reply)
                break
            # silent: dead only once silent for dead_after_s (it may be busy loading an
            # engine); either way ask the next one for a report
            if now - self._answered.setdefault(s.name, now) >= self.dead_after_s:
                dead.add(s.name)
        if report is None and self.anchor is not None:
            reply = self._ask(self.anchor, caller, timeout_ms)
            if isinstance(reply, msg.StabiliseReply):
                report = _report(reply)
        with self._lock:
            if self._epoch != epoch:
                # re-configured meanwhile (a round pinging a dead successor takes a second or
                # more, and the source's re-route around it lands within it): the source's
                # lists win, or the round would put the dead successor back in front
                return
            new = mb.stabilise(base, report, dead, self._r)
            newly_dead = dead - self._dead
            self._view, self._dead = new, frozenset(dead)
            self.rounds += 1
            if newly_dead:
                self.dead_epoch += 1
        for name in sorted(newly_dead):
            log.warning("%s: successor %s does not answer; frames go past it", self.name, name)
            if self._on_dead is not None:
                self._on_dead(name)

    def _ask(self, addr: str, m: msg.ControlMessage, timeout_ms: int) -> msg.ControlMessage | None:
        client = self._clients.get(addr)
        try:
            if client is None:
                client = self._clients[addr] = ControlClient(addr, key=self._key, tls=self._tls)
            return client.request(m, timeout_ms=timeout_ms)
        except ArmdiError:
            # a timed-out Req0 may answer late; start afresh with the next ping
            if client is not None:
                client.close()
            self._clients.pop(addr, None)
            return None


def _report(reply: msg.StabiliseReply) -> mb.Report:
    return mb.Report(to_member(reply.predecessor) if reply.predecessor else None,
                     tuple(to_member(s) for s in reply.successors))
