"""Thin, typed wrappers over pynng (NNG) sockets: data frames and control messages.

Every blocking call takes a timeout, and pynng's exceptions never escape: they are mapped to
our own tree with ``raise ... from``::

    TransportError (ArmdiError)     a socket could not listen, dial, send or receive
    ├── TransportTimeout            nothing happened within the timeout
    └── TransportClosed             the socket was closed (often: this side is shutting down)

Sockets:

- ``DataInbox``: Pull0, listens; ``recv`` returns a zero-copy view of the received message.
- ``DataOutbox``: Push0, dials one or more successors (round-robin among those connected);
  ``send`` passes the caller's buffer to NNG without a Python-side copy.
- ``ControlServer``: Rep0, answers one ``ControlMessage`` per ``serve_once``.
- ``ControlClient``: Req0, ``request`` returns the reply or raises within the timeout.

Dials never block: NNG keeps redialling in the background (every ``reconnect_min_ms``
growing to ``reconnect_max_ms``), and the send or request timeout bounds the wait. NNG does not
guarantee delivery when a connection breaks, and ``close`` does not linger: a message that was
handed to NNG but not yet written out is lost. End-to-end delivery is the source's job.

Costs measured on the 2-core, no-GPU development machine (pynng 0.9.0, NNG 1.11), 12 MiB
messages between two processes over ``ipc://``, only the call itself timed:

- receive: ``Socket.recv()`` copies the message into new bytes: median 2.2 ms (up to ~5 ms on
  a busy machine; ``recv_msg().bytes`` is the same copy). ``DataInbox.recv`` returns a view of
  NNG's message body instead: median 0.2 ms, independent of size.
- send: ``nng_send`` copies the buffer once into an NNG message: median 1.6-2.3 ms, the same
  for ``bytes`` and for ``ffi.from_buffer(bytearray | ndarray)``, so there is no Python-side
  copy. pynng's ``send`` rejects a bare ``bytearray`` or numpy array ("initializer for ctype
  'void *' must be a cdata pointer"), hence ``ffi.from_buffer``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import queue
import socket as pysocket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NoReturn

import numpy.typing as npt
import pynng
from pynng import ffi, lib
from typing_extensions import Buffer, Self

from appliance.wire.frames import FrameParts, native
from appliance.wire.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Ack,
    ControlMessage,
    MessageError,
    decode_message,
    encode_message,
)
from engines.errors import ArmdiError

IPC_PREFIX: Final = "ipc://"
TLS_PREFIX: Final = "tls+tcp://"
TLS_SERVER_NAME: Final = "armdi-node"  # every node certificate names it (appliance.keys)
MAX_IPC_PATH_BYTES: Final = 107  # sun_path is 108 bytes with its terminating NUL
DEFAULT_RECONNECT_MIN_MS: Final = 20
DEFAULT_RECONNECT_MAX_MS: Final = 1000

Handler = Callable[[ControlMessage], ControlMessage]

# The hop's NNG calls in C where the codec was built (``_codec.c``: one call to receive a
# message or send a frame, where the cffi path below makes five or six); pynng's own NNG
# functions, by address.
if native is not None:
    native.bind(*(int(ffi.cast("uintptr_t", ffi.addressof(lib, name))) for name in (
        "nng_recvmsg", "nng_sendmsg", "nng_msg_alloc", "nng_msg_free", "nng_msg_body",
        "nng_msg_len")))
    native.bind_aio(*(int(ffi.cast("uintptr_t", ffi.addressof(lib, name))) for name in (
        "nng_aio_alloc", "nng_aio_free", "nng_aio_stop", "nng_aio_result", "nng_aio_get_msg",
        "nng_recv_aio", "nng_aio_set_timeout")))
_c_recv: Final = None if native is None else native.recv
_c_send: Final = None if native is None else native.send

# Receivers that run (DataInbox.on_message), stopped at exit: their callbacks run Python on
# NNG's threads, which must not happen once the interpreter finalizes.
_receivers: set[Any] = set()
_receivers_lock = threading.Lock()


@atexit.register
def _stop_receivers() -> None:
    with _receivers_lock:
        running = list(_receivers)
        _receivers.clear()
    for receiver in running:
        receiver.stop()

log = logging.getLogger("armdi.transport")


@dataclass(frozen=True)
class TlsFiles:
    """Mutual TLS for ``tls+tcp://`` links: the cluster's CA certificate, and this node's
    private key and certificate in one PEM file (``armdi keys init`` writes both).

    Both ends present a certificate and check the other's against the CA; a peer without
    one signed by it never completes the handshake, so none of its messages arrive."""

    ca: Path
    cert_key: Path

    def config(self, *, server: bool) -> pynng.TLSConfig:
        """A pynng TLS configuration for a listening (``server``) or dialling socket."""
        mode = pynng.TLSConfig.MODE_SERVER if server else pynng.TLSConfig.MODE_CLIENT
        try:
            return pynng.TLSConfig(mode, ca_files=[str(self.ca)],
                                   cert_key_file=str(self.cert_key),
                                   auth_mode=pynng.TLSConfig.AUTH_MODE_REQUIRED,
                                   server_name=None if server else TLS_SERVER_NAME)
        except pynng.NNGException as err:
            raise TransportError(f"cannot load the TLS files {self.ca} and {self.cert_key}: "
                                 f"{err} (made by armdi keys init?)") from err


def _tls_options(tls: TlsFiles | None, *, server: bool) -> dict[str, Any]:
    """The socket option that turns TLS on (pynng applies it to tls+tcp:// endpoints only)."""
    return {} if tls is None else {"tls_config": tls.config(server=server)}


class TransportError(ArmdiError):
    """A socket could not listen, dial, send or receive."""


class TransportTimeout(TransportError):
    """A send, receive or request did not complete within its timeout."""


class TransportClosed(TransportError):
    """The socket is closed."""


@contextlib.contextmanager
def _mapped(what: str, timeout_ms: int | None = None) -> Iterator[None]:
    """Turn pynng's exceptions into ours; ``what`` says what was being done, and to whom."""
    try:
        yield
    except pynng.Timeout as err:
        raise TransportTimeout(f"{what}: timed out after {timeout_ms} ms") from err
    except pynng.Closed as err:
        raise TransportClosed(f"{what}: the socket is closed") from err
    except pynng.NNGException as err:
        raise TransportError(f"{what}: {err}") from err


def _fail(rv: int, what: str, timeout_ms: int | None = None) -> NoReturn:
    """Raise ours for NNG's error code ``rv`` (not 0) of a call made straight into NNG."""
    with _mapped(what, timeout_ms):
        pynng.check_err(rv)
    raise TransportError(f"{what}: NNG error {rv}")


def _check_timeout(timeout_ms: int) -> int:
    if timeout_ms < 0:
        raise ValueError(f"timeout_ms must be >= 0, got {timeout_ms}")
    return int(timeout_ms)


def _check_address(address: str) -> str:
    """Catch the address mistakes NNG only reports as 'Address invalid'."""
    if address.startswith(IPC_PREFIX):
        path = os.fsencode(address[len(IPC_PREFIX) :])
        if len(path) > MAX_IPC_PATH_BYTES:
            raise TransportError(
                f"ipc path of {address} is {len(path)} bytes; unix sockets allow at most "
                f"{MAX_IPC_PATH_BYTES} (use a shorter directory)")
    return address


class _Socket:
    """What every wrapper shares: one pynng socket, cached timeouts, close, context manager."""

    def __init__(self, sock: pynng.Socket, description: str) -> None:
        self._sock = sock
        self._description = description
        self._recv_timeout: int | None = None
        self._send_timeout: int | None = None
        self._nng = sock.socket  # the nng_socket handle, for calls into NNG's C API
        self._nng_id: int = sock.socket.id  # the same, for the C codec

    def _set_recv_timeout(self, timeout_ms: int) -> None:
        if timeout_ms != self._recv_timeout:
            with _mapped(f"{self._description}: set receive timeout"):
                self._sock.recv_timeout = timeout_ms
            self._recv_timeout = timeout_ms

    def _set_send_timeout(self, timeout_ms: int) -> None:
        if timeout_ms != self._send_timeout:
            with _mapped(f"{self._description}: set send timeout"):
                self._sock.send_timeout = timeout_ms
            self._send_timeout = timeout_ms

    def _listen(self, address: str) -> str:
        """Listen on ``address``; returns it with a tcp port 0 replaced by the bound port."""
        with _mapped(f"cannot listen on {address}"):
            listener = self._sock.listen(_check_address(address))
        if address.startswith(("tcp://", TLS_PREFIX)) and address.endswith(":0"):
            # str() of pynng's InAddr is right; its .port is in network byte order.
            bound = str(listener.local_address).rsplit(":", 1)[1]
            address = f"{address[:-2]}:{bound}"
        return address

    def close(self) -> None:
        """Close the socket; blocked calls in other threads raise ``TransportClosed``."""
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ---------------------------------------------------------------------------- data
class DataInbox(_Socket):
    """Receives data frames: a Pull0 socket listening on ``address``.

    Messages over ``max_bytes`` are dropped by NNG, which also closes the connection they
    came on, losing whatever the sender had queued behind them on it; the sender redials.
    ``inproc://`` does not enforce the limit at all, so ``decode_frame`` checks it again.
    """

    def __init__(self, address: str, *, max_bytes: int, recv_buffer: int | None = None,
                 tls: TlsFiles | None = None) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")  # 0 is NNG's 'no limit'
        self._receiver: Any = None  # a C Receiver, while on_message hands messages over
        super().__init__(pynng.Pull0(recv_max_size=max_bytes,
                                     **_tls_options(tls, server=True)), f"data inbox {address}")
        try:
            if recv_buffer is not None:
                with _mapped(f"data inbox {address}: set receive buffer"):
                    self._sock.recv_buffer_size = recv_buffer
            self.address = self._listen(address)
        except BaseException:
            self.close()
            raise
        self.max_bytes = max_bytes

    def on_message(self, callback: Callable[[memoryview], None]) -> bool:
        """Hand every message to ``callback`` from now on, on NNG's own thread (the one that
        received it) instead of through ``recv``: no Python thread waits and wakes per
        message. ``callback`` gets what ``recv`` returns; it runs with the GIL, so it should
        be quick, and must not close this inbox. False where the C codec was not built
        (nothing changes: receive with ``recv`` from a thread). ``close`` stops it."""
        if native is None:
            return False
        if self._receiver is not None:
            raise TransportError(f"{self._description}: already handing messages to a callback")
        receiver = native.Receiver(self._nng_id, functools.partial(_deliver, callback))
        with _receivers_lock:
            _receivers.add(receiver)
        self._receiver = receiver
        return True

    def close(self) -> None:
        """Stop a callback (``on_message``: returns once none runs), close the socket."""
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            with _receivers_lock:
                _receivers.discard(receiver)
            receiver.stop()
        super().close()

    def recv(self, timeout_ms: int) -> memoryview:
        """The next message, as a read-write ``memoryview`` of NNG's own message buffer.

        No copy: the view owns the NNG message, which is freed when the last thing that
        refers to it (the view, a slice of it, a numpy array made from it) is collected.
        """
        if timeout_ms != self._recv_timeout:
            self._set_recv_timeout(_check_timeout(timeout_ms))
        if _c_recv is not None:
            got = _c_recv(self._nng_id)
            if type(got) is int:
                _fail(got, f"receive on {self.address}", timeout_ms)
            return memoryview(got)
        msg_p = ffi.new("nng_msg **")
        rv = lib.nng_recvmsg(self._nng, msg_p, 0)
        if rv:
            _fail(rv, f"receive on {self.address}", timeout_ms)
        return _owning_view(msg_p[0])


def _deliver(callback: Callable[[memoryview], None], got: Any) -> None:
    """One message from a C ``Receiver`` to ``callback`` as ``recv`` gives it; an NNG error
    (not a close: that ends the receiver) is logged, and receiving goes on."""
    if type(got) is int:
        log.warning("receive failed: NNG error %d (%s)", got, ffi.string(lib.nng_strerror(got))
                    .decode(errors="replace"))
        return
    callback(memoryview(got))


def _owning_view(msg: Any) -> memoryview:
    """A memoryview of ``msg``'s body that frees ``msg`` when it is garbage.

    ``ffi.gc`` ties ``nng_msg_free`` to a pointer to the body, and ``ffi.buffer`` (hence the
    memoryview, and any numpy array over it) keeps that pointer alive. pynng's own
    ``Message._buffer`` does not: a view of it dangles once the Message is collected.
    """
    size = lib.nng_msg_len(msg)
    if size == 0:
        lib.nng_msg_free(msg)
        return memoryview(b"")
    body = ffi.gc(ffi.cast("char *", lib.nng_msg_body(msg)),
                  lambda _body: lib.nng_msg_free(msg), size)
    return memoryview(ffi.buffer(body, size))


class LinkEmulation:
    """A link of ``rate_Bps`` bytes/s emulated on the sending side: each message occupies the
    link for ``size / rate_Bps`` seconds, one after another, and the sender waits until its
    message has gone out, as it would behind a slow NIC with a small buffer. For benches and
    experiments on one machine (``[cluster] emulate_links``); real links need none."""

    def __init__(self, rate_Bps: float) -> None:
        if not rate_Bps > 0:
            raise ValueError(f"rate_Bps must be > 0, got {rate_Bps}")
        self.rate_Bps = float(rate_Bps)
        self._free_at = 0.0
        self._lock = threading.Lock()

    def transmit(self, size: int) -> float:
        """Wait while ``size`` bytes cross the link; returns the seconds waited."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = done = start + size / self.rate_Bps
        wait = done - now
        if wait > 0:
            time.sleep(wait)
        return max(wait, 0.0)


class DelayLine:
    """An emulated propagation delay: messages reach NNG ``delay_s`` after they were sent,
    from a thread of their own, so the sender does not wait for it (as on a long link, where
    several messages are on the wire at once). At most ``depth`` messages wait; a sender
    beyond that blocks. A message NNG does not take in time is dropped and logged (the
    source's replay delivers it end to end), as a real link loses one that cannot go out."""

    def __init__(self, delay_s: float, sock: pynng.Socket, what: Callable[[], str],
                 depth: int = 64) -> None:
        if not delay_s > 0:
            raise ValueError(f"delay_s must be > 0, got {delay_s}")
        self.delay_s = float(delay_s)
        self._sock = sock
        self._what = what
        self._queue: queue.Queue[tuple[float, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="delay line", daemon=True)
        self._thread.start()

    def put(self, msg: Any) -> None:
        """Take ownership of ``msg`` (an ``nng_msg *``) and send it ``delay_s`` from now."""
        self._queue.put((time.monotonic() + self.delay_s, msg))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                due, msg = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if self._stop.wait(max(0.0, due - time.monotonic())):
                lib.nng_msg_free(msg)
                break
            rv = lib.nng_sendmsg(self._sock.socket, msg, 0)
            if rv:
                lib.nng_msg_free(msg)
                if not self._stop.is_set():
                    log.warning("delay line: %s: %s; message dropped", self._what(),
                                ffi.string(lib.nng_strerror(rv)).decode(errors="replace"))

    def close(self) -> None:
        """Stop (call after the socket is closed, so a blocked send returns) and free the
        messages still waiting."""
        self._stop.set()
        self._thread.join(timeout=5)
        while True:
            try:
                _due, msg = self._queue.get_nowait()
            except queue.Empty:
                break
            lib.nng_msg_free(msg)


class DataOutbox(_Socket):
    """Sends data frames: a Push0 socket dialling ``addresses`` (non-blocking dials).

    With several addresses connected, NNG spreads messages among them round-robin.
    """

    def __init__(self, addresses: str | Sequence[str] = (), *,
                 send_buffer: int | None = None,
                 reconnect_min_ms: int = DEFAULT_RECONNECT_MIN_MS,
                 reconnect_max_ms: int = DEFAULT_RECONNECT_MAX_MS,
                 tls: TlsFiles | None = None, rate_Bps: float | None = None,
                 delay_s: float = 0.0) -> None:
        sock = pynng.Push0(reconnect_time_min=reconnect_min_ms,
                           reconnect_time_max=reconnect_max_ms,
                           **_tls_options(tls, server=False))
        super().__init__(sock, "data outbox")
        self._lock = threading.Lock()
        self._link = None if rate_Bps is None else LinkEmulation(rate_Bps)
        self._delay = None if delay_s <= 0 else DelayLine(delay_s, sock, self._send_what)
        self._dialers: dict[str, pynng.Dialer] = {}
        try:
            if send_buffer is not None:
                with _mapped("data outbox: set send buffer"):
                    self._sock.send_buffer_size = send_buffer
            for address in [addresses] if isinstance(addresses, str) else addresses:
                self.dial(address)
        except BaseException:
            self.close()
            raise

    @property
    def addresses(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._dialers)

    def dial(self, address: str) -> None:
        """Add ``address`` to the peers (connects in the background; no-op if present)."""
        with self._lock:
            if address in self._dialers:
                return
            with _mapped(f"cannot dial {address}"):
                self._dialers[address] = self._sock.dial(_check_address(address), block=False)

    def hang_up(self, address: str) -> None:
        """Stop sending to ``address`` (no-op if it is not a peer)."""
        with self._lock:
            dialer = self._dialers.pop(address, None)
            if dialer is not None:
                with contextlib.suppress(pynng.NNGException, KeyError):
                    dialer.close()

    def redial(self, address: str) -> None:
        """Send to ``address`` only, from now on (a new successor)."""
        for old in self.addresses:
            if old != address:
                self.hang_up(old)
        self.dial(address)

    def send(self, buf: Buffer | npt.NDArray[Any], timeout_ms: int) -> None:
        """Hand ``buf`` (bytes, bytearray, memoryview, numpy array: C-contiguous) to NNG.

        Returns once NNG has queued it for a connected peer; raises ``TransportTimeout``
        when no peer took it within ``timeout_ms`` (none connected, or all busy).
        """
        self._set_send_timeout(_check_timeout(timeout_ms))
        data = ffi.from_buffer(buf)
        if self._link is not None:
            self._link.transmit(len(data))
        if self._delay is not None:
            msg_p = ffi.new("nng_msg **")
            rv = lib.nng_msg_alloc(msg_p, len(data))
            if rv:
                _fail(rv, "data outbox: allocate a message")
            ffi.memmove(ffi.cast("char *", lib.nng_msg_body(msg_p[0])), data, len(data))
            self._delay.put(msg_p[0])
            return
        with _mapped(self._send_what(), timeout_ms):
            pynng.check_err(lib.nng_send(self._sock.socket, data, len(data), 0))

    def send_frame(self, parts: FrameParts, timeout_ms: int) -> None:
        """Send one frame, given as ``frame_parts`` makes it: NNG allocates a message of the
        frame's size, the three parts are copied into it (the payload straight from the
        tensor: its one copy on this side) and the message itself is sent.

        Returns once NNG has queued it for a connected peer; raises ``TransportTimeout``
        when no peer took it within ``timeout_ms`` (none connected, or all busy).
        """
        head, payload, tag = parts
        if timeout_ms != self._send_timeout:
            self._set_send_timeout(_check_timeout(timeout_ms))
        n_head = len(head)
        n_payload = 0 if payload is None else payload.nbytes
        size = n_head + n_payload + len(tag)
        if self._link is not None:
            self._link.transmit(size)
        if _c_send is not None and self._delay is None:
            rv = _c_send(self._nng_id, head, payload, tag)
            if rv:
                _fail(rv, self._send_what(), timeout_ms)
            return
        msg_p = ffi.new("nng_msg **")
        rv = lib.nng_msg_alloc(msg_p, size)
        if rv:
            _fail(rv, "data outbox: allocate a message")
        msg = msg_p[0]
        body = ffi.cast("char *", lib.nng_msg_body(msg))
        ffi.memmove(body, head, n_head)
        if n_payload:
            ffi.memmove(body + n_head, payload, n_payload)
        if tag:
            ffi.memmove(body + n_head + n_payload, tag, len(tag))
        if self._delay is not None:
            self._delay.put(msg)
            return
        rv = lib.nng_sendmsg(self._nng, msg, 0)
        if rv:  # not sent: the message is still ours
            lib.nng_msg_free(msg)
            _fail(rv, self._send_what(), timeout_ms)

    def _send_what(self) -> str:
        return f"send to {', '.join(self.addresses) or '(no peer)'}"

    def close(self) -> None:
        super().close()
        if self._delay is not None:
            self._delay.close()


# ---------------------------------------------------------------------------- control
class ControlServer(_Socket):
    """Answers control messages: a Rep0 socket listening on ``address``."""

    def __init__(self, address: str, *, key: bytes | None,
                 max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 tls: TlsFiles | None = None) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        super().__init__(pynng.Rep0(recv_max_size=max_bytes, **_tls_options(tls, server=True)),
                         f"control server {address}")
        try:
            self.address = self._listen(address)
        except BaseException:
            self.close()
            raise
        self._key = key
        self._max_bytes = max_bytes

    def serve_once(self, handler: Handler, timeout_ms: int) -> ControlMessage | None:
        """Wait up to ``timeout_ms`` for one request and answer it with ``handler(request)``.

        Returns the request, or None when none came. A request that does not decode is
        answered ``Ack(ok=False, reason=...)`` and then raised as ``MessageError``; a handler
        that raises gets its requester the same kind of answer and the exception re-raised,
        so a requester never waits for a reply that will not come.
        """
        self._set_recv_timeout(_check_timeout(timeout_ms))
        self._set_send_timeout(timeout_ms)
        msg_p = ffi.new("nng_msg **")
        try:
            with _mapped(f"receive on {self.address}", timeout_ms):
                pynng.check_err(lib.nng_recvmsg(self._sock.socket, msg_p, 0))
        except TransportTimeout:
            return None
        data = _owning_view(msg_p[0])
        try:
            request = decode_message(data, self._key, self._max_bytes)
        except MessageError as err:
            self._reply(Ack(ok=False, reason=f"rejected by {self.address}: {err}"))
            raise
        try:
            reply = handler(request)
        except Exception as err:
            self._reply(Ack(ok=False, reason=f"{type(request).__name__} failed on "
                                             f"{self.address}: {err}"))
            raise
        self._reply(reply)
        return request

    def _reply(self, reply: ControlMessage) -> None:
        data = encode_message(reply, self._key)
        with _mapped(f"reply on {self.address}", self._send_timeout):
            self._sock.send(data)


class ControlClient(_Socket):
    """Asks one node: a Req0 socket dialling ``address`` in the background.

    One request at a time (a lock serialises threads). Requests are not resent on a timer,
    so a slow handler runs once; NNG does resend a request whose connection broke.
    """

    def __init__(self, address: str, *, key: bytes | None,
                 max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 reconnect_min_ms: int = DEFAULT_RECONNECT_MIN_MS,
                 reconnect_max_ms: int = DEFAULT_RECONNECT_MAX_MS,
                 tls: TlsFiles | None = None) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        sock = pynng.Req0(recv_max_size=max_bytes, resend_time=-1,
                          reconnect_time_min=reconnect_min_ms,
                          reconnect_time_max=reconnect_max_ms,
                          **_tls_options(tls, server=False))
        super().__init__(sock, f"control client {address}")
        try:
            with _mapped(f"cannot dial {address}"):
                self._sock.dial(_check_address(address), block=False)
        except BaseException:
            self.close()
            raise
        self.address = address
        self._key = key
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    def request(self, msg: ControlMessage, timeout_ms: int) -> ControlMessage:
        """Send ``msg`` and return the reply, all within ``timeout_ms``.

        Raises ``TransportTimeout`` naming the address when nobody answers in time,
        ``MessageError`` when the reply does not decode (e.g. a different cluster key).
        """
        deadline = time.monotonic() + _check_timeout(timeout_ms) / 1000
        data = encode_message(msg, self._key)
        kind = type(msg).__name__
        with self._lock:
            self._set_send_timeout(timeout_ms)
            try:
                with _mapped(f"send {kind} to {self.address}", timeout_ms):
                    self._sock.send(data)
            except TransportTimeout as err:
                raise TransportTimeout(
                    f"could not reach {self.address} within {timeout_ms} ms to send {kind} "
                    f"(is the node running and listening there?)") from err
            remaining = max(0, round((deadline - time.monotonic()) * 1000))
            self._set_recv_timeout(remaining)
            msg_p = ffi.new("nng_msg **")
            try:
                with _mapped(f"receive from {self.address}", remaining):
                    pynng.check_err(lib.nng_recvmsg(self._sock.socket, msg_p, 0))
            except TransportTimeout as err:
                raise TransportTimeout(
                    f"no reply from {self.address} to {kind} within {timeout_ms} ms "
                    f"(the node may be down or busy)") from err
        return decode_message(_owning_view(msg_p[0]), self._key, self._max_bytes)


# ---------------------------------------------------------------------------- ipc files
def cleanup_ipc(address: str) -> bool:
    """Remove the socket file an ``ipc://`` listener left behind (e.g. after kill -9).

    Returns True when a stale file was removed; False for other schemes, a missing file, or
    a socket someone still listens on. A path that is not a socket is never removed.
    """
    if not address.startswith(IPC_PREFIX):
        return False
    path = address[len(IPC_PREFIX) :]
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as err:
        raise TransportError(f"cannot inspect {path}: {err}") from err
    if not stat.S_ISSOCK(mode):
        raise TransportError(f"{path} is not a unix socket; refusing to remove it")
    probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except OSError:
        pass  # refused: nobody listens, the file is stale
    else:
        return False
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True
