"""``PUT /v1/nodes/{name}/slowdown`` and ``POST /v1/nodes/{name}/fault``: demo controls.

Served when the pipeline implements ``appliance.api.NodeControls``; otherwise they answer 501
and ``GET /v1/pipeline`` lists no controls, so the status page shows no buttons. Like every
endpoint they need the API token when one is set.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException

from appliance.api import FAULT_ACTIONS, NodeControls, Pipeline
from web.routers import PipelineDep

router = APIRouter(prefix="/v1/nodes", tags=["nodes"])

MAX_SLOWDOWN = 1000.0


def controls_of(pipeline: Pipeline) -> list[str]:
    """The controls ``pipeline`` offers, as ``GET /v1/pipeline`` lists them."""
    if isinstance(pipeline, NodeControls):
        return ["slowdown", *FAULT_ACTIONS]
    return []


def _controls(pipeline: Pipeline) -> NodeControls:
    if not isinstance(pipeline, NodeControls):
        raise HTTPException(501, "this runtime offers no slowdown control or fault injection")
    return pipeline


def _known(pipeline: Pipeline, name: str) -> None:
    if name not in {node.name for node in pipeline.status().nodes}:
        raise HTTPException(404, f"no node named '{name}'")


@router.put("/{name}/slowdown")
async def set_slowdown(
    name: str, pipeline: PipelineDep,
    factor: Annotated[float, Body(embed=True, ge=1.0, le=MAX_SLOWDOWN,
                                  description="1.0: the node's own speed; 4.0: 4x slower.")],
) -> dict[str, Any]:
    """Emulate a slower node (compute runs, then the node waits the extra time)."""
    controls = _controls(pipeline)
    _known(pipeline, name)
    await controls.set_slowdown(name, factor)
    return {"node": name, "factor": factor}


@router.post("/{name}/fault")
async def inject_fault(
    name: str, pipeline: PipelineDep,
    action: Annotated[Literal["kill", "pause", "resume", "cut"], Body(embed=True)],
) -> dict[str, Any]:
    """Kill, pause (SIGSTOP), resume (SIGCONT) a node, or cut its link."""
    controls = _controls(pipeline)
    _known(pipeline, name)
    await controls.inject_fault(name, action)
    return {"node": name, "action": action}
