"""Serving the front end: the listening socket and uvicorn around ``create_app``.

The socket is made here, before anything else starts, so a port in use is one clear error and
port 0 gets a real port to print. It is made with ``IPPROTO_TCP`` named explicitly: asyncio
turns Nagle's algorithm off (``TCP_NODELAY``) only on accepted sockets whose protocol is
``IPPROTO_TCP``, and a socket from ``socket.create_server`` has protocol 0. With Nagle on, a
response written in two parts (headers, then body) on a kept-alive connection waits for the
client's delayed ACK: 40 ms on every request after the first.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

from engines.errors import ArmdiError

__all__ = ["exposure_warning", "listen", "serve", "url_of"]

GRACEFUL_SHUTDOWN_S = 2


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``host:port`` whose accepted connections get TCP_NODELAY."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ArmdiError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); check the "
                         "host name") from exc
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if hasattr(socket, "SO_REUSEADDR"):  # as create_server: restart without TIME_WAIT
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ArmdiError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose "
                         "another with --port (or source.http_port)") from exc
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def exposure_warning(sock: socket.socket, token: str | None) -> str | None:
    """A warning when ``sock`` accepts connections from other machines and the API has no
    token; None when it is bound to loopback or a token is set."""
    if token is not None:
        return None
    host = sock.getsockname()[0]
    try:
        if ipaddress.ip_address(host.split("%")[0]).is_loopback:
            return None
    except ValueError:
        pass
    return (f"the API at {url_of(sock)} is reachable from other machines and has no token: "
            "anyone who reaches it can send requests and read the pipeline. Set "
            "ARMDI_API_TOKEN (or --api-token-file), or bind to 127.0.0.1.")


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def serve(pipeline: Any, sock: socket.socket, **app_options: Any) -> None:
    """Serve the web front end for ``pipeline`` on ``sock`` until Ctrl-C or SIGTERM.

    A signal stops uvicorn gracefully, then this raises KeyboardInterrupt (outside the event
    loop), so the callers' ``finally`` blocks (which stop the workers and remove the socket
    files) always run; SIGTERM before the server runs raises it at once."""
    import uvicorn

    from web.app import create_app

    # An open status page holds an event stream that never ends by itself: after Ctrl-C, give
    # the requests in flight a moment, then stop (rather than wait for a second Ctrl-C).
    server = _make_server(uvicorn.Config(create_app(pipeline, **app_options),
                                         log_level="warning", lifespan="on",
                                         timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    signal.signal(signal.SIGTERM, _raise_interrupt)
    server.run(sockets=[sock])
    if server.stopped_by is not None:  # now, outside the event loop: no traceback from it
        raise KeyboardInterrupt(f"signal {server.stopped_by}")


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, stopped by Ctrl-C or SIGTERM without re-raising the signal
        inside its event loop (uvicorn >= 0.29 does, and the lifespan task, cancelled then,
        logs a traceback): ``serve`` raises KeyboardInterrupt once the loop is done."""

        stopped_by: int | None = None

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self._on_signal) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def _on_signal(self, sig: int, _frame: object) -> None:
            self.stopped_by = sig
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for requests
            self.should_exit = True

    return Server


def _make_server(config: Any) -> Any:
    return _server_class()(config)
