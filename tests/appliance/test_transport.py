"""pynng wrappers over inproc://, ipc:// (in tmp_path) and tcp:// on loopback."""

from __future__ import annotations

import gc
import hashlib
import itertools
import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.wire import frames as fr
from appliance.wire import messages as m
from appliance.wire import transport
from appliance.wire.transport import (
    ControlClient,
    ControlServer,
    DataInbox,
    DataOutbox,
    TransportClosed,
    TransportError,
    TransportTimeout,
    cleanup_ipc,
)
from tests.conftest import needs_c_codec

FP = hashlib.sha256(b"model").digest()
KEY = b"cluster-key"
LIMIT = 4 << 20
_names = itertools.count()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory for ipc sockets (a unix socket path is at most 107 bytes)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="armdi-") as path:
        yield Path(path)


@pytest.fixture(params=["inproc", "ipc", "tcp"])
def address(request: pytest.FixtureRequest, short_tmp: Path) -> str:
    if request.param == "inproc":
        return f"inproc://armdi-test-{next(_names)}"
    if request.param == "ipc":
        return f"ipc://{short_tmp}/data.sock"
    return "tcp://127.0.0.1:0"


@pytest.fixture(params=["c", "cffi"])
def hop_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The hop's NNG calls: the C codec's, or pynng's cffi (an install without the codec)."""
    if request.param == "c":
        if transport._c_recv is None:
            pytest.skip("the C codec (appliance/wire/_codec.c) was not built at install")
    else:
        monkeypatch.setattr(transport, "_c_recv", None)
        monkeypatch.setattr(transport, "_c_send", None)
    return str(request.param)


def free_tcp_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def frame(n: int = 1000, request_id: int = 1) -> fr.Frame:
    return fr.Frame(kind=fr.FrameKind.ACTIVATION, request_id=request_id, attempt=0,
                    fingerprint=FP, start_block=2,
                    tensor=np.arange(n, dtype=np.float32).reshape(-1, 10),
                    trace=(fr.TraceEntry("source", 0, 2, 0.5),))


def raises_timeout_within(fn: Callable[[], object], timeout_ms: int) -> TransportTimeout:
    """Call ``fn``; it must raise TransportTimeout, after about ``timeout_ms`` (< 2x)."""
    start = time.monotonic()
    with pytest.raises(TransportTimeout) as info:
        fn()
    elapsed = time.monotonic() - start
    assert 0.9 * timeout_ms / 1000 <= elapsed < 2 * timeout_ms / 1000 + 0.1, elapsed
    return info.value


# ---------------------------------------------------------------------------- data
def test_frame_round_trip(address: str) -> None:
    with DataInbox(address, max_bytes=LIMIT) as inbox, DataOutbox(inbox.address) as outbox:
        assert not inbox.address.endswith(":0")
        sent = frame()
        outbox.send(fr.encode_frame(sent, KEY), timeout_ms=2000)
        buf = inbox.recv(timeout_ms=2000)
        got = fr.decode_frame(buf, key=KEY, max_bytes=LIMIT)
        np.testing.assert_array_equal(got.tensor, sent.tensor)
        assert got.request_id == 1 and got.trace == sent.trace


def test_recv_is_a_zero_copy_view_that_owns_the_message(short_tmp: Path, hop_path: str) -> None:
    address = f"ipc://{short_tmp}/zc.sock"
    inbox = DataInbox(address, max_bytes=LIMIT)
    with DataOutbox(address) as outbox:
        outbox.send(np.arange(256 * 1024, dtype=np.float32), timeout_ms=2000)  # a numpy buffer
        view = inbox.recv(timeout_ms=2000)
    assert not view.readonly and len(view) == 1 << 20
    owner = type(view.obj)  # NNG's memory, not a bytes copy
    assert (owner is fr.native.Message if hop_path == "c"
            else owner.__module__ == "_cffi_backend")
    tensor = np.frombuffer(view, dtype=np.float32)[1000:]
    assert np.shares_memory(tensor, np.frombuffer(view, np.uint8))
    del view
    inbox.close()
    gc.collect()
    np.testing.assert_array_equal(tensor[:3], [1000, 1001, 1002])  # still alive, not freed


def test_send_accepts_every_buffer_kind() -> None:
    address = f"inproc://armdi-test-{next(_names)}"
    payload = bytes(range(256)) * 4
    kinds: list[Any] = [payload, bytearray(payload), memoryview(payload),
             np.frombuffer(payload, np.uint8), np.frombuffer(payload, np.float32)]
    with DataInbox(address, max_bytes=LIMIT) as inbox, DataOutbox(address) as outbox:
        for buf in kinds:
            outbox.send(buf, timeout_ms=1000)
            assert bytes(inbox.recv(timeout_ms=1000)) == payload
        outbox.send(b"", timeout_ms=1000)
        assert len(inbox.recv(timeout_ms=1000)) == 0


@pytest.mark.parametrize("timeout_ms", [0, 200])
def test_recv_timeout(timeout_ms: int) -> None:
    address = f"inproc://armdi-test-{next(_names)}"
    with DataInbox(address, max_bytes=LIMIT) as inbox:
        err = raises_timeout_within(lambda: inbox.recv(timeout_ms=timeout_ms), timeout_ms)
        assert f"receive on {address}: timed out after {timeout_ms} ms" in str(err)


def test_send_without_a_peer_times_out_naming_it(short_tmp: Path) -> None:
    address = f"ipc://{short_tmp}/nobody.sock"
    with DataOutbox(address) as outbox:
        err = raises_timeout_within(lambda: outbox.send(b"x", timeout_ms=200), 200)
        assert f"send to {address}" in str(err)
    with DataOutbox() as lonely:
        err = raises_timeout_within(lambda: lonely.send(b"x", timeout_ms=200), 200)
        assert "(no peer)" in str(err)


def test_redial_moves_to_a_new_successor() -> None:
    a, b = (f"inproc://armdi-test-{next(_names)}" for _ in range(2))
    with DataInbox(a, max_bytes=LIMIT) as first, DataInbox(b, max_bytes=LIMIT) as second, \
            DataOutbox(a) as outbox:
        outbox.send(b"one", timeout_ms=1000)
        assert bytes(first.recv(timeout_ms=1000)) == b"one"
        outbox.redial(b)
        assert outbox.addresses == (b,)
        outbox.send(b"two", timeout_ms=1000)
        assert bytes(second.recv(timeout_ms=1000)) == b"two"
        with pytest.raises(TransportTimeout):
            first.recv(timeout_ms=100)


def test_oversize_messages_are_dropped_by_nng(short_tmp: Path) -> None:
    address = f"ipc://{short_tmp}/small.sock"
    with DataInbox(address, max_bytes=1000) as inbox, DataOutbox(address) as outbox:
        outbox.send(bytes(5000), timeout_ms=1000)
        with pytest.raises(TransportTimeout):
            inbox.recv(timeout_ms=300)
        # NNG closed that connection; the outbox redials and later frames get through.
        for _ in range(5):
            outbox.send(b"small", timeout_ms=1000)
            try:
                assert bytes(inbox.recv(timeout_ms=300)) == b"small"
                break
            except TransportTimeout:
                continue
        else:
            pytest.fail("no frame got through after an oversize one")


def test_inproc_does_not_enforce_the_limit_so_decode_does() -> None:
    address = f"inproc://armdi-test-{next(_names)}"
    with DataInbox(address, max_bytes=100) as inbox, DataOutbox(address) as outbox:
        outbox.send(fr.encode_frame(frame(), None), timeout_ms=1000)
        with pytest.raises(fr.OversizeFrameError):
            fr.decode_frame(inbox.recv(timeout_ms=1000), key=None, max_bytes=100)


def test_frames_travel_by_either_path(address: str, hop_path: str) -> None:
    frame = fr.Frame(kind=fr.FrameKind.ACTIVATION, request_id=7, attempt=2, fingerprint=FP,
                     start_block=3, tensor=np.arange(12, dtype=np.float32).reshape(3, 4),
                     trace=(fr.TraceEntry(node="w1", start=0, end=3, ms=0.5),), ext=b"\x01")
    with DataInbox(address, max_bytes=LIMIT) as inbox:
        with DataOutbox(inbox.address) as outbox:
            for key in (None, KEY):
                outbox.send_frame(fr.frame_parts(frame, key), timeout_ms=5000)
                got = fr.decode_frame(inbox.recv(timeout_ms=5000), key=key, max_bytes=LIMIT)
                assert (got.request_id, got.attempt, got.start_block, got.ext, got.trace) == (
                    7, 2, 3, b"\x01", frame.trace)
                np.testing.assert_array_equal(got.tensor, frame.tensor)
            outbox.send(b"", timeout_ms=5000)
            assert len(inbox.recv(timeout_ms=5000)) == 0
        started = time.monotonic()
        with pytest.raises(TransportTimeout):
            inbox.recv(timeout_ms=100)
        assert time.monotonic() - started < 5
    with DataOutbox(f"inproc://armdi-test-{next(_names)}") as lonely, \
            pytest.raises(TransportTimeout):  # nobody is listening: the send times out
        lonely.send_frame(fr.frame_parts(frame, None), timeout_ms=100)


def test_close_unblocks_a_waiting_recv(hop_path: str) -> None:
    inbox = DataInbox(f"inproc://armdi-test-{next(_names)}", max_bytes=LIMIT)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            inbox.recv(timeout_ms=10_000)
        except TransportError as err:
            errors.append(err)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.1)
    inbox.close()
    thread.join(timeout=2)
    assert not thread.is_alive() and isinstance(errors[0], TransportClosed)


@needs_c_codec
def test_on_message_hands_every_message_over_on_nngs_thread(address: str) -> None:
    got: list[tuple[bytes, str, bool]] = []
    done = threading.Event()

    def take(buf: memoryview) -> None:
        got.append((bytes(buf), threading.current_thread().name, buf.readonly))
        if len(got) == 50:
            done.set()

    with DataInbox(address, max_bytes=LIMIT) as inbox, DataOutbox(inbox.address) as outbox:
        assert inbox.on_message(take)
        with pytest.raises(TransportError, match="already"):
            inbox.on_message(take)
        for i in range(50):
            outbox.send(i.to_bytes(4, "little") * (i + 1), timeout_ms=2000)
        assert done.wait(10)
    assert [g[0] for g in got] == [i.to_bytes(4, "little") * (i + 1) for i in range(50)]
    # no thread of ours: NNG's own, which Python knows only as a 'Dummy' thread
    assert {g[1] for g in got} != {threading.current_thread().name}
    assert all(g[1].startswith("Dummy") for g in got) and not any(g[2] for g in got)


@needs_c_codec
def test_on_message_goes_on_after_a_callback_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    unraisable: list[Any] = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    got: list[bytes] = []

    def take(buf: memoryview) -> None:
        got.append(bytes(buf))
        if buf[0] == 1:
            raise RuntimeError("a bug in the callback")

    address = f"inproc://armdi-test-{next(_names)}"
    with DataInbox(address, max_bytes=LIMIT) as inbox, DataOutbox(address) as outbox:
        inbox.on_message(take)
        for b in (b"\x00", b"\x01", b"\x02"):
            outbox.send(b, timeout_ms=2000)
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert got == [b"\x00", b"\x01", b"\x02"]
    assert len(unraisable) == 1 and isinstance(unraisable[0].exc_value, RuntimeError)


@needs_c_codec
def test_close_waits_for_a_running_callback_and_stops_them() -> None:
    entered, calls = threading.Event(), []

    def slow(buf: memoryview) -> None:
        calls.append(time.monotonic())
        entered.set()
        time.sleep(0.3)  # the GIL is released while it sleeps: close can run meanwhile

    address = f"inproc://armdi-test-{next(_names)}"
    inbox = DataInbox(address, max_bytes=LIMIT)
    with DataOutbox(address) as outbox:
        inbox.on_message(slow)
        for _ in range(20):
            outbox.send(b"x", timeout_ms=2000)
        assert entered.wait(5)
        inbox.close()
        closed = time.monotonic()
        assert closed - calls[0] >= 0.29  # it waited for the callback that ran
        count = len(calls)
        time.sleep(0.5)
    assert len(calls) == count < 20  # and none ran after: the rest stayed unreceived
    inbox.close()  # twice is harmless


def test_on_message_without_the_c_codec_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "native", None)
    with DataInbox(f"inproc://armdi-test-{next(_names)}", max_bytes=LIMIT) as inbox:
        assert inbox.on_message(lambda buf: None) is False


@needs_c_codec
def test_a_process_exits_cleanly_with_a_receiver_still_running(short_tmp: Path) -> None:
    """Left running (no close), a receiver is stopped at exit: its callbacks must not run
    Python on NNG's threads while the interpreter finalizes (a crash or a hang)."""
    import subprocess
    import sys

    script = (
        "import time\n"
        "from appliance.wire.transport import DataInbox, DataOutbox\n"
        f"a = 'ipc://{short_tmp}/exit.sock'\n"
        "inbox = DataInbox(a, max_bytes=1 << 20)\n"
        "seen = []\n"
        "inbox.on_message(lambda buf: (seen.append(len(buf)), time.sleep(0.001)))\n"
        "out = DataOutbox(a)\n"
        "for _ in range(200): out.send(b'x' * 1000, timeout_ms=2000)\n"
        "while not seen: time.sleep(0.01)\n"
        "print('ok', flush=True)\n")  # exits with messages still arriving
    for _ in range(3):
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=60, cwd=Path(__file__).parents[2])
        assert run.returncode == 0 and run.stdout == "ok\n", (run.returncode, run.stderr)


def test_address_errors(short_tmp: Path) -> None:
    address = f"ipc://{short_tmp}/busy.sock"
    with DataInbox(address, max_bytes=LIMIT), \
            pytest.raises(TransportError, match=f"cannot listen on {address}: Address in use"):
        DataInbox(address, max_bytes=LIMIT)
    with pytest.raises(TransportError, match="unix sockets allow at most 107"):
        DataInbox("ipc:///tmp/" + "x" * 120, max_bytes=LIMIT)
    with pytest.raises(TransportError, match="cannot dial bogus://x"):
        DataOutbox("bogus://x")
    with pytest.raises(ValueError):
        DataInbox(address, max_bytes=0)


# ---------------------------------------------------------------------------- control
class Server:
    """A ControlServer answering in a thread until stopped."""

    def __init__(self, address: str, key: bytes | None) -> None:
        self.server = ControlServer(address, key=key)
        self.address = self.server.address
        self.seen: list[m.ControlMessage] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def handle(self, msg: m.ControlMessage) -> m.ControlMessage:
        if isinstance(msg, m.StatusRequest):
            return m.NodeStatus(node="w1", start=0, end=4, queue_depth=1, queue_capacity=8,
                                processed=9, dropped={"bad_tag": 2}, slowdown=1.0)
        if isinstance(msg, m.Shutdown) and msg.reason == "explode":
            raise RuntimeError("handler blew up")
        return m.Ack(ok=True, reason=type(msg).__name__)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                request = self.server.serve_once(self.handle, timeout_ms=50)
            except (m.MessageError, RuntimeError) as err:
                self.errors.append(err)
                continue
            if request is not None:
                self.seen.append(request)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self.server.close()


@pytest.mark.parametrize("key", [None, KEY])
def test_request_reply(address: str, key: bytes | None) -> None:
    server = Server(address, key)
    try:
        with ControlClient(server.address, key=key) as client:
            reply = client.request(m.StatusRequest(), timeout_ms=2000)
            assert isinstance(reply, m.NodeStatus) and reply.dropped == {"bad_tag": 2}
            hb = m.Heartbeat(node="source", seq=1, sent_at=time.time())
            assert client.request(hb, timeout_ms=2000) == m.Ack(ok=True, reason="Heartbeat")
    finally:
        server.close()
    assert server.seen == [m.StatusRequest(), hb]  # after the join: serve_once returns last


def test_bad_requests_are_answered_and_raised() -> None:
    server = Server(f"inproc://armdi-test-{next(_names)}", KEY)
    try:
        with ControlClient(server.address, key=None) as untagged, \
                pytest.raises(m.MessageError, match="tagged but no cluster key"):
            untagged.request(m.StatusRequest(), timeout_ms=2000)  # the reply is tagged
        with ControlClient(server.address, key=KEY) as client:
            reply = client.request(m.Shutdown(reason="explode"), timeout_ms=2000)
            assert isinstance(reply, m.Ack) and not reply.ok
            assert "Shutdown failed" in reply.reason and "handler blew up" in reply.reason
            assert isinstance(client.request(m.Shutdown(), timeout_ms=2000), m.Ack)
        deadline = time.monotonic() + 2
        while len(server.errors) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(server.errors[0], m.MessageError)
        assert "no tag but a cluster key" in str(server.errors[0])
        assert isinstance(server.errors[1], RuntimeError)
    finally:
        server.close()


def test_serve_once_returns_none_when_idle() -> None:
    with ControlServer(f"inproc://armdi-test-{next(_names)}", key=None) as server:
        start = time.monotonic()
        assert server.serve_once(lambda msg: msg, timeout_ms=100) is None
        assert 0.09 <= time.monotonic() - start < 0.25


@pytest.mark.parametrize("kind", ["tcp", "ipc", "inproc"])
def test_request_to_nobody_times_out_naming_the_address(kind: str, short_tmp: Path) -> None:
    address = {"tcp": free_tcp_address(), "ipc": f"ipc://{short_tmp}/none.sock",
               "inproc": f"inproc://armdi-test-{next(_names)}"}[kind]
    with ControlClient(address, key=None) as client:
        err = raises_timeout_within(lambda: client.request(m.StatusRequest(), timeout_ms=250),
                                    250)
        assert f"could not reach {address}" in str(err)


def test_request_to_a_silent_server_times_out_within_the_budget() -> None:
    address = f"inproc://armdi-test-{next(_names)}"
    with ControlServer(address, key=None), ControlClient(address, key=None) as client:
        err = raises_timeout_within(  # nobody calls serve_once
            lambda: client.request(m.StatusRequest(), timeout_ms=250), 250)
        assert f"no reply from {address}" in str(err)


def test_client_finds_a_server_that_starts_later(short_tmp: Path) -> None:
    address = f"ipc://{short_tmp}/late.sock"
    with ControlClient(address, key=None) as client:
        with pytest.raises(TransportTimeout):
            client.request(m.StatusRequest(), timeout_ms=100)
        server = Server(address, None)
        try:
            assert client.request(m.Shutdown(), timeout_ms=3000) == m.Ack(ok=True,
                                                                           reason="Shutdown")
        finally:
            server.close()


# ---------------------------------------------------------------------------- ipc files
def test_cleanup_ipc(short_tmp: Path) -> None:
    stale = short_tmp / "stale.sock"
    with socket.socket(socket.AF_UNIX) as leftover:
        leftover.bind(str(stale))  # bound, never listening, closed without unlink: stale
    assert stale.exists()
    assert cleanup_ipc(f"ipc://{stale}") is True and not stale.exists()
    assert cleanup_ipc(f"ipc://{stale}") is False
    live = f"ipc://{short_tmp}/live.sock"
    with DataInbox(live, max_bytes=LIMIT):
        assert cleanup_ipc(live) is False and os.path.exists(live[len("ipc://"):])
    plain = short_tmp / "plain.txt"
    plain.write_text("keep me")
    with pytest.raises(TransportError, match="not a unix socket"):
        cleanup_ipc(f"ipc://{plain}")
    assert cleanup_ipc("tcp://127.0.0.1:5000") is False


# ---------------------------------------------------------------------------- processes
FRAMES = 50
FRAME_FLOATS = 256 * 1024  # 1 MiB of float32


def _receiver(address: str, ready: mp.Queue, done: mp.Queue) -> None:  # type: ignore[type-arg]
    seen: dict[int, float] = {}
    with DataInbox(address, max_bytes=2 * FRAME_FLOATS * 4) as inbox:
        ready.put("listening")
        deadline = time.monotonic() + 20
        while len(seen) < FRAMES and time.monotonic() < deadline:
            try:
                got = fr.decode_frame(inbox.recv(timeout_ms=500), key=KEY,
                                      max_bytes=2 * FRAME_FLOATS * 4)
            except TransportTimeout:
                continue
            seen[got.request_id] = float(got.tensor[0, 0]) + float(got.tensor[-1, -1])
    done.put(seen)


def test_two_processes_50_frames_of_1_mib_over_ipc(short_tmp: Path) -> None:
    address = f"ipc://{short_tmp}/proc.sock"
    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(address, ready, done))
    proc.start()
    try:
        assert ready.get(timeout=20) == "listening"
        with DataOutbox(address) as outbox:
            for i in range(FRAMES):
                tensor = np.full((FRAME_FLOATS // 64, 64), float(i), dtype=np.float32)
                data = fr.encode_frame(fr.Frame(
                    kind=fr.FrameKind.ACTIVATION, request_id=i, attempt=0, fingerprint=FP,
                    start_block=1, tensor=tensor), KEY)
                assert len(data) > 1 << 20
                outbox.send(data, timeout_ms=5000)
            seen = done.get(timeout=25)  # close only after delivery: NNG does not linger
        assert seen == {i: 2.0 * i for i in range(FRAMES)}
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()


def test_an_emulated_link_spaces_messages_by_size_over_rate() -> None:
    """Back-to-back sends queue behind each other on the link: each starts when the previous
    one is through (time measured, but only against the link's own arithmetic)."""
    from appliance.wire.transport import LinkEmulation

    link = LinkEmulation(rate_Bps=1e9)
    waits = [link.transmit(1_000_000) for _ in range(3)]  # 1 ms each at 1 GB/s
    assert all(w > 0 for w in waits)
    assert link._free_at >= 0.003  # three messages' worth of link time, one after another
    with pytest.raises(ValueError, match="rate_Bps"):
        LinkEmulation(0)


def test_an_emulated_link_is_applied_to_sends(short_tmp: Path) -> None:
    addr = f"ipc://{short_tmp}/link"
    with DataInbox(addr, max_bytes=1 << 20) as inbox, \
            DataOutbox(addr, rate_Bps=50_000.0) as outbox:
        assert outbox._link is not None
        t0 = time.monotonic()
        outbox.send(b"x" * 5_000, timeout_ms=2000)  # 0.1 s of link time at 50 kB/s
        assert time.monotonic() - t0 >= 0.09  # the sender waited for the link: never less
        assert bytes(inbox.recv(timeout_ms=2000)) == b"x" * 5_000


def test_a_delayed_outbox_delivers_in_order_no_sooner_than_the_delay(address: str) -> None:
    delay_s = 0.15
    with DataInbox(address, max_bytes=LIMIT) as inbox, \
            DataOutbox(inbox.address, delay_s=delay_s) as outbox:
        sent_at = []
        for i in range(3):  # the sender does not wait for the delay: all three go at once
            sent_at.append(time.monotonic())
            outbox.send(bytes([i]) * 10, timeout_ms=2000)
            outbox.send_frame(fr.frame_parts(frame(), KEY), timeout_ms=2000)
        for i in range(3):
            assert bytes(inbox.recv(timeout_ms=5000)) == bytes([i]) * 10
            assert time.monotonic() - sent_at[i] >= delay_s
            fr.decode_frame(inbox.recv(timeout_ms=5000), key=KEY, max_bytes=LIMIT)


def test_a_delayed_outbox_closes_with_messages_waiting(address: str) -> None:
    outbox = DataOutbox(address, delay_s=5.0)  # nobody listens
    outbox.send(b"x" * 100, timeout_ms=100)
    outbox.close()  # frees them, returns at once
