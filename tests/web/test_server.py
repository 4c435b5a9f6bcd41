"""The front end's listening socket: clear errors, and no Nagle stall on kept-alive connections."""

from __future__ import annotations

import http.client
import socket

import pytest

from engines.errors import ArmdiError
from tests.serving import running
from tests.web import FakePipeline
from web.app import create_app
from web.server import listen, url_of


def test_accepted_connections_have_nagle_off() -> None:
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; a socket from
    ``socket.create_server`` has proto 0, and every kept-alive request then waits 40 ms for
    the client's delayed ACK. Checked on the connection uvicorn itself accepted."""
    sock = listen("127.0.0.1", 0)
    with running(create_app(FakePipeline()), sock) as server:
        host, port = sock.getsockname()[:2]
        client = http.client.HTTPConnection(host, port, timeout=10)
        try:
            for _ in range(2):  # the same kept-alive connection twice
                client.request("GET", "/v2/health/live")
                response = client.getresponse()
                response.read()
                assert response.status == 200
                assert response.getheader("connection", "keep-alive") != "close"
            accepted = [c.transport.get_extra_info("socket")
                        for c in server.server_state.connections]
            assert len(accepted) == 1
            assert accepted[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            client.close()


def test_listen_names_the_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ArmdiError, match=rf"cannot listen on 127.0.0.1:{port} .*--port"):
            listen("127.0.0.1", port)


def test_listen_on_port_0_gets_a_real_port() -> None:
    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert url_of(sock).startswith("http://127.0.0.1:") and not url_of(sock).endswith(":0/")
    finally:
        sock.close()
