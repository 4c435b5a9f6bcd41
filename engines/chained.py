"""Run a segment ``[i, j)`` as a chain of smaller engines when no fused engine was built."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from engines.base import BaseEngine, Engine


class ChainedEngine(BaseEngine):
    """Engines ``[i, a), [a, b), ..., [z, j)`` run back to back as ``[i, j)``."""

    def __init__(self, engines: Sequence[Engine]):
        if not engines:
            raise ValueError("a chain needs at least one engine")
        for left, right in itertools.pairwise(engines):
            if left.end != right.start:
                raise ValueError(f"engines do not chain: [{left.start},{left.end}) then "
                                 f"[{right.start},{right.end})")
        self.engines = list(engines)
        self.backend = f"chain({engines[0].backend})"
        super().__init__(engines[0].start, engines[-1].end, engines[0].input_spec,
                         engines[-1].output_spec)

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        for engine in self.engines:
            x = engine.infer(x)
        return x

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
