"""ONNX Runtime backend: one InferenceSession per segment file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engines.base import BaseEngine, TensorSpec
from engines.errors import BackendUnavailableError, EngineError


def available_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
        raise BackendUnavailableError(f"onnxruntime is not installed: {exc}") from exc
    return list(ort.get_available_providers())


def session_options(threads: int = 1, spinning: bool = False, prepacking: bool = True) -> Any:
    """Options for a session that shares its process with other sessions.

    Intra-op spinning is off by default: with many sessions in one process, spinning threads
    starve each other (a 50-segment chain ran 30x slower with spinning on). ``prepacking=False``
    keeps large weights as they are in the (memory-mapped) weights file instead of copying
    them into MLAS's packed layout: a session then opens in milliseconds instead of ~0.6 s
    for vgg16's classifier, for engines run once (the builder's verification).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3
    if not prepacking:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def default_providers(device: str = "auto") -> list[str]:
    """CUDA first where the CUDA provider is installed (``device='auto'``), else CPU."""
    have = available_providers()
    if device == "cpu" or "CUDAExecutionProvider" not in have:
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OrtEngine(BaseEngine):
    backend = "ort"

    def __init__(
        self,
        path: Path,
        start: int,
        end: int,
        *,
        threads: int = 1,
        providers: list[str] | None = None,
        spinning: bool = False,
        prepacking: bool = True,
    ):
        import onnxruntime as ort

        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=session_options(threads, spinning, prepacking),
                providers=providers or default_providers(),
            )
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise EngineError(f"{path}: onnxruntime could not load the segment ({first})") from exc
        inp = self._session.get_inputs()[0]
        out = self._session.get_outputs()[0]
        super().__init__(start, end, _spec(inp), _spec(out))
        self.path = path
        self._input_name = inp.name
        self._output_names = [out.name]

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        try:
            result = self._session.run(self._output_names, {self._input_name: x})[0]
        except Exception as exc:
            raise EngineError(f"{self.label}: inference failed: {exc}") from exc
        return np.asarray(result)

    def close(self) -> None:
        self._session = None


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(bool)": "bool",
}


def _spec(node_arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in node_arg.shape)
    return TensorSpec(node_arg.name, shape, _ORT_TYPES.get(node_arg.type, "float32"))
