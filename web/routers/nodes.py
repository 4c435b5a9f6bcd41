"""``PUT /v1/nodes/{name}/slowdown`` and ``POST /v1/nodes/{name}/fault``: experiments.

The slowdown changes a node's emulated slowdown while it runs.

For experiments and demos ("w2 becomes 4x slower at t = 10 s"): the node really computes,
then waits ``factor - 1`` times that long, and the adaptive controller moves blocks away.
"""

from __future__ import annotations

from typing import Any, Literal

import anyio
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from web.routers import PipelineDep

router = APIRouter(prefix="/v1/nodes", tags=["nodes"])


class Slowdown(BaseModel):
    factor: float = Field(ge=1.0, le=1e6, description="1 = full speed, 4 = four times slower")


@router.put("/{name}/slowdown")
async def set_slowdown(name: str, body: Slowdown, pipeline: PipelineDep) -> dict[str, Any]:
    """Set node ``name``'s emulated slowdown factor (labelled as emulation wherever shown)."""
    nodes = {n.name for n in pipeline.status().nodes}
    if name not in nodes:
        raise HTTPException(404, f"no node named {name!r}; nodes: {', '.join(sorted(nodes))}")
    await anyio.to_thread.run_sync(pipeline.set_slowdown, name, body.factor)
    return {"node": name, "slowdown": body.factor}


class FaultRequest(BaseModel):
    action: Literal["kill", "pause", "resume", "cut"]
    seconds: float = Field(3.0, gt=0, le=3600, description="pause and cut last this long")


@router.post("/{name}/fault")
async def inject_fault(name: str, body: FaultRequest, pipeline: PipelineDep) -> dict[str, Any]:
    """Inject a fault into node ``name`` (tests and demos): kill, pause, resume or cut."""
    nodes = {n.name for n in pipeline.status().nodes if n.role == "worker"}
    if name not in nodes:
        raise HTTPException(404, f"no worker named {name!r}; workers: "
                                 f"{', '.join(sorted(nodes))}")
    done = await anyio.to_thread.run_sync(pipeline.fault, name, body.action, body.seconds)
    return {"node": name, "action": body.action, "done": done}
