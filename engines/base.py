"""The segment engine interface.

An engine runs one segment ``[start, end)`` of a model: it takes the activation at cut point
``start`` (batch first) and returns the activation at cut point ``end``. Backends subclass
``BaseEngine`` and implement ``_infer_impl``; the public ``infer`` validates first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from engines.errors import InputSpecError


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (``-1`` for the dynamic batch axis) and numpy dtype name of a tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape without the batch axis."""
        return tuple(self.shape[1:])

    @property
    def bytes_per_sample(self) -> int:
        return int(np.prod(self.sample_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def check(self, array: np.ndarray, what: str) -> None:
        """Raise ``InputSpecError`` unless ``array`` has this dtype and sample shape."""
        if array.dtype != np.dtype(self.dtype):
            raise InputSpecError(
                f"{what}: expected dtype {self.dtype} for {self.name!r}, got {array.dtype}"
            )
        if array.ndim != len(self.shape) or tuple(array.shape[1:]) != self.sample_shape:
            expected = ("N", *self.sample_shape)
            raise InputSpecError(
                f"{what}: expected shape {expected} for {self.name!r}, got {tuple(array.shape)}"
            )
        if array.shape[0] < 1:
            raise InputSpecError(f"{what}: empty batch for {self.name!r}")


@runtime_checkable
class Engine(Protocol):
    """What the runtime needs from a loaded segment."""

    backend: str
    start: int
    end: int
    input_spec: TensorSpec
    output_spec: TensorSpec

    def infer(self, x: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class BaseEngine:
    """Validation shared by every backend; subclasses implement ``_infer_impl``."""

    backend = "base"

    def __init__(self, start: int, end: int, input_spec: TensorSpec, output_spec: TensorSpec):
        if not 0 <= start < end:
            raise ValueError(f"bad segment [{start}, {end})")
        self.start = start
        self.end = end
        self.input_spec = input_spec
        self.output_spec = output_spec

    @property
    def label(self) -> str:
        return f"{self.backend}[{self.start},{self.end})"

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.input_spec.check(x, self.label)
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        return self._infer_impl(x)

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the backend's resources. Safe to call twice."""

    def __enter__(self) -> BaseEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
