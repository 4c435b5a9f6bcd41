"""The manifest schema: what a built model repository entry holds.

``manifest.json`` is written last by the builder, so a directory without one is never served.
Every file the manifest names carries its sha256 and size; ``engines.repository`` checks them.

The model **fingerprint** is a content hash (``content_fingerprint``): the sha256 of the stored
full graph, of the weights file, of the block layout (cut points, input and output) and of the
preprocessing. It does not depend on where or when the model was built, by which armdi, nor on
the device profiles, the engines built for a backend or which fused segments exist: two
devices holding the same fingerprint compute the same function block by block.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field

# 2: the fingerprint is the content hash below (version 1 hashed the raw export, which
#    carried path-dependent exporter metadata).
SCHEMA_VERSION = 2
FINGERPRINT_FORMAT = "armdi-content-v1"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Preprocessing(_Frozen):
    """How an image becomes the model input: resize the short side, centre-crop, normalise."""

    resize: int = 256
    crop: int = 224  # the crop's height (and width, unless crop_width says otherwise)
    crop_width: int | None = None  # a non-square crop (camera frames); None: square
    layout: str = "NCHW"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    dtype: str = "float32"


class TensorInfo(_Frozen):
    name: str
    shape: tuple[int, ...]  # -1 marks the dynamic batch axis
    dtype: str = "float32"
    bytes_per_sample: int


class CutPoint(TensorInfo):
    """Boundary ``index`` between block ``index - 1`` and block ``index``.

    ``cut_points[0]`` is the model input and ``cut_points[K]`` the model output.
    """

    index: int


class FileEntry(_Frozen):
    sha256: str
    bytes: int


class SegmentEntry(_Frozen):
    start: int
    end: int
    path: str  # relative to the model directory
    precision: str = "fp32"
    key: str | None = None  # backend-specific cache key (TensorRT)


class Verification(_Frozen):
    passed: bool
    max_abs_error: float
    tolerance: float
    samples: int
    top1_agreement: float
    segments_checked: int
    detail: str = ""
    # tolerance and max_relative_error: max abs error / max abs reference, per tensor
    max_relative_error: float | None = None
    min_cosine: float | None = None


class DeviceProfile(_Frozen):
    """Latencies measured on one device with one backend (milliseconds, median, batch 1)."""

    device: str
    backend: str
    threads: int
    repeats: int
    full_model_ms: float
    block_ms: tuple[float, ...]
    segment_ms: dict[str, float] = Field(default_factory=dict)  # "i:j" -> ms, fused segments
    created: str


class SourceInfo(_Frozen):
    kind: str  # "torchvision" | "efficientnet_lite0" | "onnx"
    name: str
    weights: str


class Manifest(_Frozen):
    schema_version: int = SCHEMA_VERSION
    model_id: str
    fingerprint: str  # content_fingerprint(): graph, weights, block layout, preprocessing
    source: SourceInfo
    created: str
    armdi_version: str
    opset: int
    input: TensorInfo
    output: TensorInfo
    preprocessing: Preprocessing
    labels: tuple[str, ...] | None = None
    blocks: int
    cut_points: tuple[CutPoint, ...]
    full_model: str  # relative path of the full model ONNX (shares the weights file)
    weights_file: str
    segment_mode: str  # "all" | "blocks" | "window:W"
    segments: dict[str, tuple[SegmentEntry, ...]]  # backend -> segments built
    files: dict[str, FileEntry]
    verification: Verification  # ONNX Runtime segments against the full model
    backend_verification: dict[str, Verification] = Field(default_factory=dict)  # e.g. "trt"
    profiles: dict[str, DeviceProfile] = Field(default_factory=dict)

    def content_fingerprint(self) -> str:
        """The fingerprint this manifest's content gives (``fingerprint`` must equal it)."""
        graph, weights = self.files.get(self.full_model), self.files.get(self.weights_file)
        if graph is None or weights is None:
            missing = self.full_model if graph is None else self.weights_file
            raise ValueError(f"{missing} is not listed in the manifest's files")
        return content_fingerprint(graph_sha256=graph.sha256, weights_sha256=weights.sha256,
                                   input=self.input, output=self.output,
                                   cut_points=self.cut_points,
                                   preprocessing=self.preprocessing)

    def profile_for(self, device: str, backend: str) -> DeviceProfile | None:
        """This device's profile for ``backend``; else this device's for any backend; else
        another device's (the allocator's best guess until this device profiles itself)."""
        mine = [p for p in self.profiles.values() if p.device == device]
        for candidates in ([p for p in mine if p.backend == backend], mine,
                           list(self.profiles.values())):
            if candidates:
                return candidates[0]
        return None

    def activation_bytes(self) -> list[int]:
        """Bytes per sample at each boundary 0..K."""
        return [c.bytes_per_sample for c in self.cut_points]

    def segment(self, backend: str, start: int, end: int) -> SegmentEntry | None:
        for seg in self.segments.get(backend, ()):
            if seg.start == start and seg.end == end:
                return seg
        return None


def content_fingerprint(*, graph_sha256: str, weights_sha256: str, input: TensorInfo,
                        output: TensorInfo, cut_points: tuple[CutPoint, ...],
                        preprocessing: Preprocessing) -> str:
    """sha256 (hex) of what a node computes: the stored full graph and weights file (their
    sha256), the block layout and the preprocessing, in a canonical JSON form.

    The stored graph carries no exporter metadata, doc strings or producer version (the
    builder strips them), so the same model gives the same fingerprint on any machine. Labels,
    profiles, timestamps, versions, paths and backend engines are left out on purpose."""
    doc = {
        "format": FINGERPRINT_FORMAT,
        "graph": graph_sha256,
        "weights": weights_sha256,
        "input": input.model_dump(mode="json"),
        "output": output.model_dump(mode="json"),
        "cut_points": [c.model_dump(mode="json") for c in cut_points],
        "preprocessing": preprocessing.model_dump(
            mode="json", exclude={"crop_width"} if preprocessing.crop_width is None else None),
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
