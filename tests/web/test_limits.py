"""API protection: a client over its rate gets 429s and nobody else does; too many event
streams, too big a batch, too long a request are answered 429, 413, 504 with JSON errors."""

from __future__ import annotations

import asyncio
import math
from collections.abc import MutableMapping
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.web import INPUT_SHAPE, MODEL_ID, FakePipeline
from web.app import create_app
from web.limits import ApiLimits, LimitsMiddleware, RateLimiter

INFER = f"/v2/models/{MODEL_ID}/infer"


def _infer_doc(batch: int) -> dict[str, Any]:
    shape = [batch, *INPUT_SHAPE[1:]]
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape,
                        "data": [0.5] * math.prod(shape)}]}


def test_the_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=10.0, burst=3, clock=lambda: now[0])
    assert [limiter.wait_s("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait_s("a") == pytest.approx(0.1)
    assert limiter.wait_s("b") == 0.0  # another client has its own bucket
    now[0] += 0.1
    assert limiter.wait_s("a") == 0.0


def test_the_limiter_forgets_the_least_recent_clients() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=100)
    for i in range(1000):
        limiter.wait_s(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._buckets) == 100


async def _get(app: Any, client: str, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(client, 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await http.get(path)


def test_a_client_over_its_rate_gets_429_and_others_are_not_affected() -> None:
    app = create_app(FakePipeline(), limits=ApiLimits(rate_per_s=1.0, burst=5))

    async def run() -> tuple[list[int], list[int], httpx.Response]:
        flood = [(await _get(app, "10.0.0.66", "/v1/pipeline")).status_code for _ in range(20)]
        others = [(await _get(app, f"10.0.0.{i}", "/v1/pipeline")).status_code
                  for i in range(1, 6)]
        refused = await _get(app, "10.0.0.66", "/v2/health/live")
        return flood, others, refused

    flood, others, refused = asyncio.run(run())
    assert flood[:5] == [200] * 5 and set(flood[5:]) == {429}
    assert others == [200] * 5
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "too many requests" in refused.json()["error"]  # /v2: {"error": ...}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_too_big_a_batch_is_413_and_a_batch_within_the_limit_runs() -> None:
    with TestClient(create_app(FakePipeline(), limits=ApiLimits(max_batch=4))) as client:
        over = client.post(INFER, json=_infer_doc(5))
        ok = client.post(INFER, json=_infer_doc(4))
        inf = _infer_doc(1)
        inf["inputs"][0]["data"][0] = 1e39  # beyond FP32: infinite once cast
        not_finite = client.post(INFER, json=inf)
    assert over.status_code == 413 and "limit of 4" in over.json()["error"]
    assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [4, 10]
    assert not_finite.status_code == 400 and "finite" in not_finite.json()["error"]


class SlowPipeline(FakePipeline):
    async def infer(self, tensor: np.ndarray, timeout_s: float | None = None) -> Any:
        await asyncio.sleep(30)
        return await super().infer(tensor, timeout_s)


def test_a_request_over_the_time_limit_is_504_and_the_next_is_served() -> None:
    pipeline = SlowPipeline()
    with TestClient(create_app(pipeline, limits=ApiLimits(request_timeout_s=0.3))) as client:
        slow = client.post(INFER, json=_infer_doc(1))
        fast = client.get("/v2/health/live")
    assert slow.status_code == 504 and "over 0.3 s" in slow.json()["error"]
    assert fast.status_code == 200


def test_event_streams_over_the_limit_get_429() -> None:
    """The middleware around a stand-in stream that stays open until released."""
    release = asyncio.Event()

    async def stream(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await release.wait()
        await send({"type": "http.response.body", "body": b""})

    middleware = LimitsMiddleware(stream, ApiLimits(max_event_subscribers=2))

    async def open_one() -> tuple[asyncio.Task[None], list[dict[str, Any]]]:
        sent: list[dict[str, Any]] = []

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        scope = {"type": "http", "path": "/v1/events", "method": "GET", "headers": [],
                 "client": ("10.0.0.1", 1)}
        task = asyncio.ensure_future(middleware(scope, receive, send))
        await asyncio.sleep(0.01)
        return task, sent

    async def run() -> tuple[list[int], int, int]:
        first = [await open_one() for _ in range(2)]
        third_task, third = await open_one()
        await third_task
        release.set()
        for task, _sent in first:
            await task
        release.clear()
        again_task, again = await open_one()
        release.set()
        await again_task
        return ([sent[0]["status"] for _t, sent in first], third[0]["status"],
                again[0]["status"])

    opened, third, after = asyncio.run(run())
    assert opened == [200, 200]
    assert third == 429
    assert after == 200  # a closed stream frees its place
