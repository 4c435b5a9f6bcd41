"""The web front end, built by ``create_app(pipeline)``; ``uvicorn`` serves what it returns.

One router per resource (``web.routers``). This module wires them, maps errors to HTTP
statuses in one place, and caps request bodies:

    InputSpecError        400  the image or tensor is unreadable or the wrong shape
    QueueFullError        503  with ``Retry-After: 1``: back-pressure, try again shortly
    NotReadyError         503  starting, or no live path through the model
    RequestTimeoutError   504
    other ArmdiError      502  the pipeline failed the request

Errors are ``{"detail": message}`` bodies, except under ``/v2`` where the Open Inference
Protocol wants ``{"error": message}``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api import NotReadyError, Pipeline, QueueFullError, RequestTimeoutError
from engines.errors import ArmdiError, InputSpecError
from web import auth
from web.limits import ApiLimits, LimitsMiddleware
from web.routers import WebSettings, classify, metrics, nodes, server_version, v2
from web.routers import pipeline as pipeline_routes

__all__ = ["ApiLimits", "WebSettings", "create_app"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


def create_app(pipeline: Pipeline, *, title: str = "armdi",
               metrics_registry: CollectorRegistry | None = None,
               settings: WebSettings | None = None,
               limits: ApiLimits | None = None) -> FastAPI:
    """The FastAPI app serving ``pipeline``.

    ``metrics_registry``: where the HTTP and pipeline metrics are registered (a fresh registry
    by default; never the process-global one). ``settings``: upload and body limits, and the
    API token that turns on bearer authentication (``web.auth``). ``limits``: per-client
    rate, batch, time and SSE limits (``web.limits``; safe defaults).
    """
    limits = limits if limits is not None else ApiLimits()
    settings = settings if settings is not None else WebSettings()
    registry = metrics_registry if metrics_registry is not None else CollectorRegistry()
    app = FastAPI(title=title, version=server_version(), redoc_url=None)
    app.state.pipeline = pipeline
    app.state.settings = settings
    app.state.limits = limits
    app.state.metrics_registry = registry

    for router in (classify.router, v2.router, pipeline_routes.router, nodes.router,
                   metrics.router, auth.router):
        app.include_router(router)
    app.add_api_route("/", index, include_in_schema=False)
    app.add_api_route("/favicon.ico", no_icon, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    app.add_exception_handler(ArmdiError, _armdi_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]

    http_metrics = metrics.HttpMetrics(registry)
    registry.register(metrics.PipelineCollector(pipeline))
    # The last added runs first: metrics see every request, the 401s and 413s too; a request
    # without the token is refused before its body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_token is not None:
        app.add_middleware(auth.AuthMiddleware, token=settings.api_token)
    app.add_middleware(LimitsMiddleware, limits=limits)  # 429s before a token or a body
    app.add_middleware(metrics.MetricsMiddleware, metrics=http_metrics, routes=app.routes)
    return app


async def index() -> FileResponse:
    """The status page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


async def no_icon() -> Response:
    """No icon (and no 404 in the browser's console)."""
    return Response(status_code=204)


# --- errors ----------------------------------------------------------------------------------


def status_for(exc: ArmdiError) -> tuple[int, dict[str, str]]:
    """HTTP status and extra headers for an error raised while serving a request."""
    if isinstance(exc, InputSpecError):
        return 400, {}
    if isinstance(exc, QueueFullError):
        return 503, {"Retry-After": "1"}
    if isinstance(exc, NotReadyError):
        return 503, {}
    if isinstance(exc, RequestTimeoutError):
        return 504, {}
    return 502, {}


def _error_body(path: str, message: str) -> dict[str, str]:
    return {"error": message} if _is_v2(path) else {"detail": message}


def _is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


async def _armdi_error(request: Request, exc: ArmdiError) -> JSONResponse:
    status, headers = status_for(exc)
    if status >= 502:
        log.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return JSONResponse(_error_body(request.url.path, str(exc)), status_code=status,
                        headers=headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if not _is_v2(request.url.path):
        return await http_exception_handler(request, exc)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                        headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    if not _is_v2(request.url.path):
        return await request_validation_exception_handler(request, exc)
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
                         for e in exc.errors())
    return JSONResponse({"error": f"invalid request: {problems}"}, status_code=400)


# --- body size limit -------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Answers 413 to a request whose body is over ``max_bytes``: at once when its
    Content-Length says so, else as soon as that many bytes have streamed in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, send)
            return
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:  # the app answered the failed read (say, 400): answer 413 instead
                if not started:
                    started = True
                    await self._reject(scope, send)
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(scope, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        message = f"request body is over the limit of {self.max_bytes} bytes"
        body = json.dumps(_error_body(scope["path"], message)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
