"""``FakePipeline``: the ``appliance.api.Pipeline`` protocol in a few lines of numpy, for tests
of the HTTP layer (the web app and the ``armdi classify`` client).

Its model takes a (1, 3, 4, 4) float32 input and returns 10 scores: score k is
``mean(x) * (k + 1)``, so a test can check that a tensor went in and came out in order.
``classify`` decodes the image for real and ranks classes by mean pixel value. Set ``fail``
to an exception to make every ``infer``/``classify`` raise it (``fail_times`` limits how many).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from appliance.api import (
    Classification,
    Hop,
    InferenceResult,
    NodeView,
    PipelineStatus,
    Prediction,
)
from engines.errors import InputSpecError
from engines.manifest import (
    CutPoint,
    Manifest,
    Preprocessing,
    SourceInfo,
    TensorInfo,
    Verification,
)
from engines.preprocess import decode_image

MODEL_ID = "fake_net"
INPUT_SHAPE = (1, 3, 4, 4)
CLASSES = 10
LABELS = tuple(f"class_{k}" for k in range(CLASSES))
PATH = (Hop("source", 0, 2, 1.5), Hop("worker-1", 2, 4, 2.5))


def fake_manifest() -> Manifest:
    inp = TensorInfo(name="input", shape=(-1, 3, 4, 4), bytes_per_sample=3 * 4 * 4 * 4)
    out = TensorInfo(name="output", shape=(-1, CLASSES), bytes_per_sample=CLASSES * 4)
    return Manifest(
        model_id=MODEL_ID, fingerprint="0" * 64,
        source=SourceInfo(kind="onnx", name="fake", weights="random"),
        created="2024-01-01T00:00:00+00:00", armdi_version="0.1.0", opset=18,
        input=inp, output=out, preprocessing=Preprocessing(resize=4, crop=4),
        labels=LABELS, blocks=4,
        cut_points=(CutPoint(index=0, **inp.model_dump()), CutPoint(index=4, **out.model_dump())),
        full_model="full.onnx", weights_file="weights.bin", segment_mode="all", segments={},
        files={}, verification=Verification(passed=True, max_abs_error=0.0, tolerance=1e-4,
                                            samples=1, top1_agreement=1.0, segments_checked=1),
    )


def fake_scores(x: np.ndarray) -> np.ndarray:
    """What the fake model computes for one (1, 3, 4, 4) input: shape (1, CLASSES)."""
    return (float(x.mean()) * np.arange(1, CLASSES + 1, dtype=np.float32))[None]


class FakePipeline:
    def __init__(self, events: list[dict[str, Any]] | None = None) -> None:
        self._manifest = fake_manifest()
        self.is_ready = True
        self.fail: Exception | None = None
        self.fail_times: int | None = None  # None: fail every call while ``fail`` is set
        self.calls = 0
        self.slowdowns: list[tuple[str, float]] = []
        self.faults: list[tuple[str, str, float]] = []
        self.event_list: list[dict[str, Any]] = events if events is not None else [
            {"type": "boundary_moved", "boundaries": [0, 2, 4]},
            {"type": "node_down", "node": "worker-1"},
        ]
        self.event_delay_s = 0.0

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    def ready(self) -> bool:
        return self.is_ready

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.fail is None:
            return
        if self.fail_times is not None:
            if self.fail_times <= 0:
                return
            self.fail_times -= 1
        raise self.fail

    async def infer(self, tensor: np.ndarray, timeout_s: float | None = None) -> InferenceResult:
        self._maybe_fail()
        if tensor.shape != INPUT_SHAPE or tensor.dtype != np.float32:
            raise InputSpecError(f"expected float32 {INPUT_SHAPE}, got {tensor.dtype} "
                                 f"{tensor.shape}")
        await asyncio.sleep(0)
        return InferenceResult(request_id=self.calls, output=fake_scores(tensor),
                               latency_ms=4.0, path=PATH)

    async def classify(self, image: bytes, top_k: int = 5,
                       timeout_s: float | None = None) -> Classification:
        self._maybe_fail()
        pixels = np.asarray(decode_image(image), dtype=np.float32)  # InputSpecError if corrupt
        scores = np.full(CLASSES, 1e-3, dtype=np.float64)
        scores[int(pixels.mean()) % CLASSES] = 1.0
        scores /= scores.sum()
        order = np.argsort(-scores, kind="stable")[:top_k]
        top = tuple(Prediction(int(k), LABELS[k], float(scores[k])) for k in order)
        return Classification(request_id=self.calls, top=top, latency_ms=4.0, path=PATH)

    def status(self) -> PipelineStatus:
        return PipelineStatus(
            model_id=MODEL_ID, fingerprint="0" * 64, mode="edgepipe", blocks=4,
            ready=self.is_ready,
            nodes=(NodeView("source", "source", 0, 2, "up", stage_ms=1.5, queue_depth=1,
                            queue_capacity=8, processed=7, address="tcp://10.0.0.1:5555"),
                   NodeView("worker-1", "worker", 2, 4, "slow", stage_ms=None, queue_depth=0,
                            queue_capacity=8, processed=7)),
            boundaries=(0, 2, 4), in_flight=1, completed=7, failed=1, retried=2,
            throughput_per_s=12.5, latency_p50_ms=4.0, latency_p99_ms=float("nan"),
            counters={"boundary_moves": 3},
        )

    def set_slowdown(self, node: str, factor: float) -> None:
        self.slowdowns.append((node, factor))

    def fault(self, node: str, action: str, seconds: float = 3.0) -> str:
        self.faults.append((node, action, seconds))
        return f"{action} {node}"

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        for event in self.event_list:
            await asyncio.sleep(self.event_delay_s)
            yield event
