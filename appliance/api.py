"""The narrow interface the web front end (and any Python caller) sees of a running pipeline.

``web`` imports only this module of ``appliance`` (plus ``engines.errors``): it submits a
request, reads a status snapshot, and subscribes to events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from engines.errors import ArmdiError
from engines.manifest import Manifest


class PipelineError(ArmdiError):
    """A request could not be served by the pipeline."""


class QueueFullError(PipelineError):
    """Back-pressure: too many requests in flight; retry later (HTTP 503)."""


class RequestTimeoutError(PipelineError):
    """No result arrived before the request's deadline, retries included (HTTP 504)."""


class NotReadyError(PipelineError):
    """The pipeline is starting or has no live path through the model (HTTP 503)."""


@dataclass(frozen=True)
class Hop:
    """One stretch of the path a request took: ``node`` ran blocks ``[start, end)``."""

    node: str
    start: int
    end: int
    ms: float


@dataclass(frozen=True)
class InferenceResult:
    request_id: int
    output: np.ndarray  # the model output, batch 1, float32
    latency_ms: float  # end to end, as the source measured it
    path: tuple[Hop, ...]
    attempts: int = 1


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float  # softmax probability


@dataclass(frozen=True)
class Classification:
    request_id: int
    top: tuple[Prediction, ...]
    latency_ms: float
    path: tuple[Hop, ...]
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "top": [{"index": p.index, "label": p.label, "score": round(p.score, 6)}
                    for p in self.top],
            "latency_ms": round(self.latency_ms, 3),
            "path": [{"node": h.node, "blocks": [h.start, h.end], "ms": round(h.ms, 3)}
                     for h in self.path],
            "attempts": self.attempts,
        }


@dataclass(frozen=True)
class NodeView:
    name: str
    role: str  # "source" | "worker"
    start: int  # block range it runs now; start == end when it runs none
    end: int
    state: str  # "up" | "slow" | "down" | "starting"
    stage_ms: float | None = None
    queue_depth: int = 0
    queue_capacity: int = 0
    processed: int = 0
    address: str = ""
    reason: str = ""  # why a worker is idle (e.g. the optimum leaves it out), or refused/down
    slowdown: float = 1.0  # emulated slowdown factor
    speed: float | None = None  # measured / profiled time of its segment
    link_Bps: float | None = None  # its output's bytes / send time
    moves: int = 0  # boundary moves it decided
    # its stage time in the exact optimum at the measured speeds (None: not known)
    optimum_stage_ms: float | None = None


@dataclass(frozen=True)
class PipelineStatus:
    model_id: str
    fingerprint: str
    mode: str
    blocks: int
    ready: bool
    nodes: tuple[NodeView, ...]
    boundaries: tuple[int, ...]
    in_flight: int
    completed: int
    failed: int
    retried: int
    throughput_per_s: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    counters: dict[str, int] = field(default_factory=dict)
    optimum: tuple[int, ...] = ()  # the exact optimum at the measured speeds (the reference)
    optimum_bottleneck_ms: float | None = None
    # mode auto: the mode chosen, why, and every alternative's predicted figures
    auto: dict[str, Any] | None = None


class Pipeline(Protocol):
    """What ``web.create_app`` needs. ``appliance.data.source.Source`` implements it."""

    @property
    def manifest(self) -> Manifest: ...

    def ready(self) -> bool: ...

    async def infer(self, tensor: np.ndarray, timeout_s: float | None = None) -> InferenceResult:
        """Run a preprocessed input (1, C, H, W) float32, or what ``prepare_image`` made of an
        image, through the pipeline."""
        ...

    async def classify(self, image: bytes, top_k: int = 5,
                       timeout_s: float | None = None) -> Classification:
        """Decode, preprocess and classify an encoded image (JPEG/PNG/WebP)."""
        ...

    def status(self) -> PipelineStatus: ...

    def set_slowdown(self, node: str, factor: float) -> None:
        """Change a node's emulated slowdown while it runs (blocking; call off the loop)."""
        ...

    def fault(self, node: str, action: str, seconds: float = 3.0) -> str:
        """Inject a fault: kill, pause, resume or cut a worker (blocking)."""
        ...

    def prepare_image(self, image: bytes) -> np.ndarray:
        """An encoded image as ``infer`` takes it, prepared as ``classify`` prepares it: the
        float32 model input, or (``Source``) its uint8 pixels, resized and cropped, that the
        node running block 0 normalises. ``InputSpecError`` when it is not a readable image."""
        ...

    def events(self) -> AsyncIterator[dict[str, Any]]:
        """Live events as JSON-able dicts, each with ``type`` and ``time`` (Unix seconds).

        The status page renders these readably (any other type as it comes): ``ready``
        (``boundaries``, ``route``), ``boundary_moved`` (``node``; optional ``detail``,
        ``reason``, ``boundaries``, ``previous``, ``route``), ``rebalanced`` (``boundaries``,
        ``before``, ``detail``), ``boundaries_set``, ``slowdown`` (``node``, ``factor``),
        ``slow`` (``node``, ``factor``), ``node_down`` (``node``, ``reason``), ``node_up``,
        ``unreachable``, ``rejoined`` (``node``, ``blocks``), ``refused`` (``node``,
        ``reason``), ``retry`` (``request_id``, ``attempt``) and ``fault`` (``node``,
        ``action``)."""
        ...
