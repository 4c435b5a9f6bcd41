"""``PUT /v1/nodes/{name}/slowdown`` and ``POST /v1/nodes/{name}/fault``: demo controls.

Slowdown: for experiments and demos ("w2 becomes 4x slower at t = 10 s"): the node really
computes, then waits ``factor - 1`` times that long, and the adaptive controller moves blocks
away. Fault injection is served when the pipeline implements ``appliance.api.FaultInjection``;
otherwise it answers 501. ``GET /v1/pipeline`` lists what is offered (``controls``), and the
status page shows a button for each. Like every endpoint they need the API token when one is
set (the page's session cookie never opens them).
"""

from __future__ import annotations

from typing import Any, Literal

import anyio
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from appliance.api import FAULT_ACTIONS, FaultInjection, Pipeline
from web.routers import PipelineDep

router = APIRouter(prefix="/v1/nodes", tags=["nodes"])


class Slowdown(BaseModel):
    factor: float = Field(ge=1.0, le=1e6, description="1 = full speed, 4 = four times slower")


class Fault(BaseModel):
    action: Literal["kill", "pause", "resume", "cut"] = Field(
        description="kill (SIGKILL), pause (SIGSTOP), resume (SIGCONT), cut (its links)")


def controls_of(pipeline: Pipeline) -> list[str]:
    """The controls ``pipeline`` offers, as ``GET /v1/pipeline`` lists them."""
    return ["slowdown", *(FAULT_ACTIONS if isinstance(pipeline, FaultInjection) else ())]


def _check_node(pipeline: Pipeline, name: str) -> None:
    nodes = {n.name for n in pipeline.status().nodes}
    if name not in nodes:
        raise HTTPException(404, f"no node named {name!r}; nodes: {', '.join(sorted(nodes))}")


@router.put("/{name}/slowdown")
async def set_slowdown(name: str, body: Slowdown, pipeline: PipelineDep) -> dict[str, Any]:
    """Set node ``name``'s emulated slowdown factor (labelled as emulation wherever shown)."""
    _check_node(pipeline, name)
    await anyio.to_thread.run_sync(pipeline.set_slowdown, name, body.factor)
    return {"node": name, "slowdown": body.factor}


@router.post("/{name}/fault")
async def inject_fault(name: str, body: Fault, pipeline: PipelineDep) -> dict[str, Any]:
    """Kill, pause or resume a node, or cut its links (where the runtime offers it)."""
    if not isinstance(pipeline, FaultInjection):
        raise HTTPException(501, "this runtime offers no fault injection yet")
    _check_node(pipeline, name)
    await anyio.to_thread.run_sync(pipeline.inject_fault, name, body.action)
    return {"node": name, "action": body.action}
