"""Limits that keep one client from taking the API down, with safe defaults.

``LimitsMiddleware`` answers, before the app sees the request:

    429  the client is over its rate (a token bucket per client address), with Retry-After
    429  too many live ``/v1/events`` streams (Server-Sent Events) at once

and bounds the time of every other request: one that has not started its answer after
``request_timeout_s`` is cancelled and answered 504. Sizes are limited elsewhere (413): the
body by ``web.app.BodyLimitMiddleware``, an image by ``/v1/classify``, a v2 batch by
``check_batch``. Every refusal is a JSON error, ``{"detail": ...}`` (``{"error": ...}``
under ``/v2``), and touches nothing but that request.

The client is the TCP peer's address: behind a reverse proxy every request comes from the
proxy, so limit there (or raise the rate here). ``ApiLimits(rate_per_s=0)`` turns the rate
limit off (benchmarks that drive the API from one address).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

EVENTS_PATH = "/v1/events"


@dataclass(frozen=True)
class ApiLimits:
    """The front end's limits (the defaults are meant to be safe on a 2-core edge device)."""

    # Requests per second each client may keep up (token bucket), and the burst it may send
    # at once. 0 turns the rate limit off.
    rate_per_s: float = 200.0
    burst: int = 400
    # Samples in one v2 infer request (413 above it).
    max_batch: int = 64
    # Seconds a request may take before it is answered 504 (SSE streams excepted).
    request_timeout_s: float = 60.0
    # Live /v1/events subscribers at once (429 above it).
    max_event_subscribers: int = 16
    # Client addresses remembered by the rate limiter (the least recent is forgotten).
    max_clients: int = 10_000

    def __post_init__(self) -> None:
        if self.rate_per_s < 0 or self.burst < 1 or self.max_batch < 1:
            raise ValueError("rate_per_s must be >= 0, burst and max_batch >= 1")
        if self.request_timeout_s <= 0 or self.max_event_subscribers < 0:
            raise ValueError("request_timeout_s must be > 0, max_event_subscribers >= 0")


class RateLimiter:
    """A token bucket per client: ``rate`` tokens a second, at most ``burst`` saved."""

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def wait_s(self, client: str) -> float:
        """Take a token for ``client``: 0.0 when it may go on, else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[client] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return wait


def check_batch(batch: Any, limits: ApiLimits) -> None:
    """A v2 request's input batch (a float tensor, or a list of encoded images): 413 over
    ``limits.max_batch`` samples, 400 when a float value is not finite (NaN or infinite
    inputs make non-JSON outputs; an FP32 cast of a large JSON number is infinite)."""
    if len(batch) > limits.max_batch:
        raise HTTPException(413, f"a batch of {len(batch)} samples is over the limit of "
                                 f"{limits.max_batch}; send smaller batches")
    if (isinstance(batch, np.ndarray) and batch.dtype.kind == "f"
            and not np.isfinite(batch).all()):
        raise HTTPException(400, "the input holds NaN or infinite values (FP32 reaches "
                                 "+-3.4e38)")


def error_body(path: str, message: str) -> bytes:
    is_v2 = path == "/v2" or path.startswith("/v2/")
    return json.dumps({"error": message} if is_v2 else {"detail": message}).encode()


async def send_error(scope: Scope, send: Send, status: int, message: str,
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = error_body(scope["path"], message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class LimitsMiddleware:
    """Per-client rate, live SSE streams, time per request (see the module docstring)."""

    def __init__(self, app: ASGIApp, limits: ApiLimits) -> None:
        self.app = app
        self.limits = limits
        self.rates = RateLimiter(limits.rate_per_s, limits.burst, limits.max_clients)
        self.subscribers = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        wait = self.rates.wait_s(client[0] if client else "unknown")
        if wait > 0:
            await send_error(scope, send, 429, "too many requests from this client; retry "
                             f"in {wait:.2f} s", ((b"retry-after", str(max(1, round(wait + 0.5)))
                                                   .encode()),))
            return
        if scope["path"] == EVENTS_PATH:
            await self._events(scope, receive, send)
            return
        await self._timed(scope, receive, send)

    async def _events(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.subscribers >= self.limits.max_event_subscribers:
            await send_error(scope, send, 429, f"{self.subscribers} event streams are open, "
                             f"the limit is {self.limits.max_event_subscribers}; close one")
            return
        self.subscribers += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.subscribers -= 1

    async def _timed(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def noting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        limit = self.limits.request_timeout_s
        with anyio.move_on_after(limit) as scope_timer:
            await self.app(scope, receive, noting_send)
        if scope_timer.cancelled_caught and not started:
            await send_error(scope, send, 504, f"the request took over {limit:g} s; retry "
                             "later, or send less at once")
