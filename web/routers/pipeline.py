"""``GET /v1/pipeline`` (a status snapshot) and ``GET /v1/events`` (live events over SSE)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from web.routers import PipelineDep, SettingsDep, json_safe
from web.routers.nodes import controls_of

router = APIRouter(prefix="/v1", tags=["pipeline"])


@router.get("/pipeline")
async def pipeline_status(pipeline: PipelineDep) -> dict[str, Any]:
    """Nodes with their block ranges, state, stage time and queue; totals and latency; the
    demo controls the runtime offers (``controls``, empty when none)."""
    snapshot: dict[str, Any] = json_safe(dataclasses.asdict(pipeline.status()))
    snapshot["controls"] = controls_of(pipeline)
    return snapshot


@router.get("/model")
async def model(pipeline: PipelineDep) -> dict[str, Any]:
    """The served model: its blocks and the activation at each cut (``cut_points[b]`` is the
    tensor between block b - 1 and block b: b = 0 is the input, b = K the output)."""
    manifest = pipeline.manifest
    return {
        "model_id": manifest.model_id, "fingerprint": manifest.fingerprint,
        "blocks": manifest.blocks,
        "input": manifest.input.model_dump(), "output": manifest.output.model_dump(),
        "preprocessing": manifest.preprocessing.model_dump(),
        "cut_points": [{"index": c.index, "tensor": c.name, "shape": list(c.shape),
                        "dtype": c.dtype, "bytes": c.bytes_per_sample}
                       for c in manifest.cut_points],
        "labels": len(manifest.labels or ()),
    }


@router.get("/events")
async def events(pipeline: PipelineDep, settings: SettingsDep) -> StreamingResponse:
    """Boundary moves, failures and rejoins as Server-Sent Events, one JSON object each."""
    return StreamingResponse(
        sse_stream(pipeline.events(), settings.events_keepalive_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def sse_stream(source: AsyncIterator[dict[str, Any]],
                     keepalive_s: float) -> AsyncGenerator[str, None]:
    """``source`` as SSE frames (``data: {json}``), with a comment line after every
    ``keepalive_s`` of silence. Ends when ``source`` ends; closes it when the client leaves."""
    iterator = aiter(source)
    pending: asyncio.Future[dict[str, Any]] | None = None
    try:
        yield ": connected\n\n"
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=keepalive_s)
            if not done:
                yield ": keep-alive\n\n"
                continue
            finished, pending = pending, None
            try:
                event = finished.result()
            except StopAsyncIteration:
                return
            yield f"data: {json.dumps(json_safe(event), default=str)}\n\n"
    finally:
        with anyio.CancelScope(shield=True):
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
