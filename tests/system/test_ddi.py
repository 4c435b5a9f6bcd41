"""Mode ddi with real processes: every worker runs the whole model, the source spreads whole
inputs over them, and a dead worker costs no request."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from appliance.api import PipelineError
from engines.preprocess import Normaliser, decode_image, pixels
from tests.conftest import BuiltModel, run_onnx
from tests.system.conftest import cluster, submit_all
from tests.system.test_resilience import _check, _events, _inputs, _wait
from web.app import create_app


def test_ddi_spreads_whole_inputs_and_matches_the_model(built_tiny: BuiltModel,
                                                        tmp_path: Path) -> None:
    inputs = _inputs(30, seed=5)
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=2, mode="ddi",
                 source_runs_blocks=False) as source:
        results = _check(built_tiny, inputs, submit_all(source, inputs))
        status = source.status()
    blocks = built_tiny.manifest.blocks
    for r in results:  # each input ran whole on one worker
        assert [(h.node, h.start, h.end) for h in r.path] in (
            [("w1", 0, blocks)], [("w2", 0, blocks)])
    served = {r.path[0].node for r in results}
    assert served == {"w1", "w2"}
    assert status.mode == "ddi" and status.failed == 0 and status.in_flight == 0
    assert [(n.name, n.start, n.end) for n in status.nodes] == [
        ("source", 0, 0), ("w1", 0, blocks), ("w2", 0, blocks)]


def test_ddi_refuses_boundaries(built_tiny: BuiltModel, tmp_path: Path) -> None:
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=1, mode="ddi") as source, \
            pytest.raises(PipelineError, match="mode ddi has no boundaries"):
        source.set_boundaries([0, 1, built_tiny.manifest.blocks])


def test_ddi_source_computes_a_share_and_jpeg_is_decoded_on_the_worker(
        built_tiny: BuiltModel, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    images = []
    for _ in range(12):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), np.uint8)).save(buffer, "JPEG")
        images.append(buffer.getvalue())
    prep = built_tiny.manifest.preprocessing
    expected = run_onnx(built_tiny.model_dir / "model.onnx", np.concatenate(
        [Normaliser(prep)(pixels(decode_image(b), prep)) for b in images]))[0]
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=1, mode="ddi", ddi_input="jpeg",
                 source_runs_blocks=True) as source, TestClient(create_app(source)) as client:
        futures = [source.submit_image(b) for b in images]
        got = [f.result(timeout=60) for f in futures]
        reply = client.post("/v1/classify", files={"file": ("x.jpg", images[0])})
        assert reply.status_code == 200, reply.text
        assert reply.json()["top"][0]["index"] == int(np.argmax(expected[0]))
        view = client.get("/v1/pipeline").json()
        assert view["mode"] == "ddi"
        assert client.get("/metrics").status_code == 200
    assert np.max(np.abs(np.concatenate([r.output for r in got]) - expected)) <= 1e-4
    assert {r.path[0].node for r in got} == {"source", "w1"}


def test_ddi_kill_9_under_load_loses_nothing(built_tiny: BuiltModel, tmp_path: Path) -> None:
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=3, mode="ddi",
                 slowdown=(20.0, 20.0, 20.0), source_runs_blocks=False,
                 request_timeout_s=20.0) as source:
        first = _inputs(40, seed=1)
        futures = submit_all(source, first)
        _wait(lambda: source.status().completed >= 5, 30, "no results before the fault")
        source.fault("w2", "kill")
        second = _inputs(40, seed=2)
        futures += submit_all(source, second)
        results = _check(built_tiny, np.concatenate([first, second]), futures)
        status = source.status()
        dead = _events(source, "node_dead")
        rerouted = _events(source, "rerouted")
    assert status.failed == 0 and status.in_flight == 0
    assert [e["node"] for e in dead] == ["w2"] and rerouted
    assert "w2" not in rerouted[-1]["route"]  # type: ignore[operator]
    assert {r.path[-1].node for r in results[-20:]} <= {"w1", "w3"}
