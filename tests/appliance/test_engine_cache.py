"""A node's engine cache: any range at once, fused engines swapped in, a memory budget."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from appliance.data.engines import EngineCache
from engines.repository import ModelRepository
from tests.conftest import BuiltModel, build_tiny, run_onnx


def _x(built: BuiltModel) -> np.ndarray:
    shape = (1, *built.manifest.input.shape[1:])
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def test_a_range_runs_at_once_chained_then_fused_once_loaded(built_tiny: BuiltModel) -> None:
    repo = ModelRepository(built_tiny.repo)
    cache = EngineCache(repo, built_tiny.manifest, "ort")
    blocks = built_tiny.manifest.blocks
    try:
        first = cache.get(0, blocks)
        assert cache.provisional(first)  # chained blocks while the fused engine loads
        np.testing.assert_allclose(first.infer(_x(built_tiny)),
                                   run_onnx(built_tiny.model_dir / "model.onnx",
                                            _x(built_tiny))[0], atol=1e-5)
        deadline = time.monotonic() + 30
        while (0, blocks) not in cache.loaded():
            assert time.monotonic() < deadline, "the fused engine never loaded"
            time.sleep(0.02)
        fused = cache.get(0, blocks)
        assert not cache.provisional(fused) and cache.last_load_ms > 0
    finally:
        cache.close()


def test_the_budget_evicts_least_recently_used_but_never_the_range_in_use(
        built_tiny: BuiltModel) -> None:
    repo = ModelRepository(built_tiny.repo)
    cache = EngineCache(repo, built_tiny.manifest, "ort", budget_mb=0.0)  # nothing fits
    try:
        cache.load_now(0, 3)
        cache.load_now(3, 6)  # over budget, but (0, 3) was in use while it loaded
        assert cache.loaded() == [(0, 3), (3, 6)]
        cache.load_now(6, 9)  # (3, 6) in use now: the least recently used one goes
        assert cache.loaded() == [(3, 6), (6, 9)]
    finally:
        cache.close()


def test_a_range_with_no_fused_engine_asks_for_one(tmp_path: Path,
                                                   tiny_onnx: Path) -> None:
    repo_dir, manifest = build_tiny(tiny_onnx, tmp_path / "repo", segments="blocks")
    cache = EngineCache(ModelRepository(repo_dir), manifest, "ort")
    asked: list[tuple[int, int]] = []
    cache.on_missing = lambda start, end: asked.append((start, end))
    try:
        engine = cache.get(2, 5)
        assert asked == [(2, 5)] and engine.start == 2 and engine.end == 5
        cache.get(4, 5)  # one block: its own engine, nothing to ask for
        assert asked == [(2, 5)]
    finally:
        cache.close()
