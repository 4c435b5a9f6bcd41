"""Serving the front end: the listening socket and uvicorn around ``create_app``.

The socket is made here, before anything else starts, so a port in use is one clear error and
port 0 gets a real port to print. It is made with ``IPPROTO_TCP`` named explicitly: asyncio
turns Nagle's algorithm off (``TCP_NODELAY``) only on accepted sockets whose protocol is
``IPPROTO_TCP``, and a socket from ``socket.create_server`` has protocol 0. With Nagle on, a
response written in two parts (headers, then body) on a kept-alive connection waits for the
client's delayed ACK: 40 ms on every request after the first.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
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

    uvicorn re-raises the signal that stopped it once it has shut down; SIGTERM is turned
    into KeyboardInterrupt first so the callers' ``finally`` blocks (which stop the workers
    and remove the socket files) always run."""
    import uvicorn

    from web.app import create_app

    # An open status page holds an event stream that never ends by itself: after Ctrl-C, give
    # the requests in flight a moment, then stop (rather than wait for a second Ctrl-C).
    server = uvicorn.Server(uvicorn.Config(create_app(pipeline, **app_options),
                                           log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    signal.signal(signal.SIGTERM, _raise_interrupt)
    server.run(sockets=[sock])
