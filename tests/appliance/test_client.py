"""``armdi classify``'s client against a real uvicorn server (``create_app(FakePipeline())`` on
127.0.0.1), and the messages it gives when there is no server or the server says no."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from appliance.api import QueueFullError
from appliance.client import ClassifyError, classify_files, normalize_url
from engines.errors import ArmdiError
from tests.serving import serving
from tests.web import FakePipeline
from web.app import create_app


@dataclass
class Server:
    url: str
    fake: FakePipeline


@pytest.fixture
def server() -> Iterator[Server]:
    fake = FakePipeline()
    with serving(create_app(fake), lifespan="off") as url:
        yield Server(url, fake)


def write_image(path: Path, fmt: str = "PNG", color: tuple[int, int, int] = (200, 10, 10)) -> Path:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_classify_files(server: Server, tmp_path: Path) -> None:
    files = [write_image(tmp_path / "a.png"), write_image(tmp_path / "b.jpg", "JPEG")]
    results = classify_files(files, server.url, top_k=3, timeout=10)
    assert [r["file"] for r in results] == [str(p) for p in files]
    for result in results:
        assert len(result["top"]) == 3
        assert [hop["node"] for hop in result["path"]] == ["source", "worker-1"]
        assert result["latency_ms"] > 0


def test_url_without_scheme(server: Server, tmp_path: Path) -> None:
    url = server.url.removeprefix("http://") + "/"
    [result] = classify_files([write_image(tmp_path / "a.webp", "WEBP")], url, 1, 10)
    assert len(result["top"]) == 1


def test_no_server(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ClassifyError) as info:
        classify_files([write_image(tmp_path / "a.png")], url, 5, 5)
    assert str(info.value) == f"no armdi server at {url}: start one with `armdi up`"
    assert isinstance(info.value, ArmdiError)


def test_server_detail_is_shown(server: Server, tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(write_image(tmp_path / "ok.png").read_bytes()[:40])
    with pytest.raises(ClassifyError, match=r"broken\.png: server answered 400 Bad Request: "
                                            r"not a readable image"):
        classify_files([corrupt], server.url, 5, 10)
    with pytest.raises(ClassifyError, match=r"server answered 422 .*less than or equal to 20"):
        classify_files([tmp_path / "ok.png"], server.url, 50, 10)


def test_unreadable_file(server: Server, tmp_path: Path) -> None:
    with pytest.raises(ClassifyError, match=r"cannot read .*missing\.png"):
        classify_files([tmp_path / "missing.png"], server.url, 5, 10)


def test_back_pressure_is_retried(server: Server, tmp_path: Path) -> None:
    image = write_image(tmp_path / "a.png")
    server.fake.fail = QueueFullError("3 requests in flight; the limit is 3")
    server.fake.fail_times = 1
    [result] = classify_files([image], server.url, 5, 10)  # waits Retry-After (1 s), then ok
    assert len(result["top"]) == 5
    server.fake.fail_times = None
    with pytest.raises(ClassifyError, match="503 Service Unavailable: 3 requests in flight"):
        classify_files([image], server.url, 5, 10, retries=0)


def test_normalize_url() -> None:
    assert normalize_url(" 10.0.0.5:8000/ ") == "http://10.0.0.5:8000"
    assert normalize_url("https://edge.local/") == "https://edge.local"
