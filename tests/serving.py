"""A real uvicorn server in a thread for the tests that talk HTTP to the front end (one
helper: the client, the server's socket, the status page and the adaptive system tests)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from web.server import listen, url_of


@contextlib.contextmanager
def running(app: Any, sock: socket.socket, **config: Any) -> Iterator[uvicorn.Server]:
    """``app`` served by uvicorn on ``sock`` (a listening socket) until the block ends;
    yields the server (its ``server_state`` holds the accepted connections). ``config``
    goes to ``uvicorn.Config`` (e.g. ``lifespan="off"``)."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped while starting"
            assert time.monotonic() < deadline, "uvicorn did not start within 20 s"
            time.sleep(0.02)
        yield server
    finally:
        server.should_exit = True
        server.force_exit = True  # an open event stream does not hold the test up
        thread.join(timeout=10)


@contextlib.contextmanager
def serving(app: Any, **config: Any) -> Iterator[str]:
    """``app`` served on a free loopback port until the block ends; yields its URL
    (``http://127.0.0.1:PORT``, no trailing slash)."""
    sock = listen("127.0.0.1", 0)
    try:
        with running(app, sock, **config):
            yield url_of(sock).rstrip("/")
    finally:
        sock.close()
