"""Through real worker processes: results equal the model run alone, every request is
accounted for, and bad input is dropped without stopping anything."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from appliance.api import QueueFullError
from engines.manifest import Preprocessing
from engines.preprocess import preprocess
from tests.conftest import BuiltModel
from tests.system.conftest import cluster, submit_all


def photo_variants(manifest_prep: Preprocessing, count: int, seed: int = 0) -> np.ndarray:
    """``count`` inputs made from scikit-image's photos: crops, flips and noise."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, n)() for n in ("chelsea", "coffee", "rocket", "astronaut")]
    out = []
    for i in range(count):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = img[top:top + ch, left:left + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        x = preprocess(Image.fromarray(np.ascontiguousarray(crop)), manifest_prep)[0]
        out.append(x + rng.normal(0, 0.05, x.shape).astype(np.float32))
    return np.stack(out)


def reference(model_path: str, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[None]})[0] for x in inputs])


@pytest.mark.parametrize(("wire", "tolerance"), [("float32", 1e-4), ("float16", 1e-2)])
def test_three_node_pipeline_matches_the_full_model(lite_repo: BuiltModel, tmp_path: Path,
                                                     wire: str, tolerance: float) -> None:
    count = 200 if wire == "float32" else 60
    inputs = photo_variants(lite_repo.manifest.preprocessing, count)
    expected = reference(str(lite_repo.source), inputs)
    with cluster(lite_repo.repo, "efficientnet_lite0", tmp_path, nodes=3, min_workers=3,
                 wire_dtype=wire) as source:
        assert source.allocation is not None
        b = source.allocation.boundaries
        assert len([n for n in range(len(b) - 1) if b[n] < b[n + 1]]) >= 3, b
        futures = submit_all(source, inputs)
        results = [f.result(timeout=60) for f in futures]
        status = source.status()
    got = np.concatenate([r.output for r in results])
    assert np.max(np.abs(got - expected)) <= tolerance
    assert (got.argmax(1) == expected.argmax(1)).all()
    # every request accounted for: one result each, none failed, none twice
    assert len({r.request_id for r in results}) == count
    assert status.completed == count and status.failed == 0 and status.in_flight == 0
    assert status.counters.get("duplicate_results", 0) == 0
    # the path covers every block exactly once, in order, through several nodes
    for r in results[:5]:
        spans = [(h.start, h.end) for h in r.path]
        assert spans[0][0] == 0 and spans[-1][1] == lite_repo.manifest.blocks
        assert all(a[1] == c[0] for a, c in itertools.pairwise(spans))
        assert len({h.node for h in r.path}) >= 3


@pytest.mark.parametrize("results", ["callback", "thread"])
def test_cat_through_the_pipeline(lite_repo: BuiltModel, tmp_path: Path, results: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Results taken on NNG's thread (the C codec's receiver), or by a thread of the source's
    own where the codec was not built."""
    import threading

    import skimage.data

    from appliance.wire import frames, transport

    if results == "thread":
        monkeypatch.setattr(transport, "native", None)
    elif frames.native is None:
        pytest.skip("the C codec (appliance/wire/_codec.c) was not built at install")
    with cluster(lite_repo.repo, "efficientnet_lite0", tmp_path, nodes=2) as source:
        loops = {t.name for t in threading.enumerate()}
        assert ("_result_loop" in loops) == (results == "thread")
        future = source.submit(preprocess(skimage.data.chelsea(),
                                          lite_repo.manifest.preprocessing))
        top = source.top_k(future.result(timeout=30), 5).top
    assert 281 <= top[0].index <= 285, top


def test_local_mode_runs_everything_on_the_source(built_tiny: BuiltModel, tmp_path: Path) -> None:
    inputs = np.random.default_rng(3).standard_normal((8, 3, 8, 8)).astype(np.float32)
    expected = reference(str(built_tiny.model_dir / "model.onnx"), inputs)
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=0, mode="local") as source:
        results = [f.result(timeout=10) for f in submit_all(source, inputs)]
    assert np.max(np.abs(np.concatenate([r.output for r in results]) - expected)) <= 1e-5
    assert all([h.node for h in r.path] == ["source"] for r in results)


def test_full_source_queue_pushes_back(built_tiny: BuiltModel, tmp_path: Path) -> None:
    inputs = np.random.default_rng(4).standard_normal((200, 3, 8, 8)).astype(np.float32)
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=1, slowdown=(200.0,),
                 source_runs_blocks=False, queue_depth=1) as source:
        accepted, rejected = [], 0
        for x in inputs:
            try:
                accepted.append(source.submit(x[None]))
            except QueueFullError:
                rejected += 1
        results = [f.result(timeout=60) for f in accepted]
    assert rejected > 0 and len(accepted) <= source.settings.max_in_flight
    assert len(results) == len(accepted)
