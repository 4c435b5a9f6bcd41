"""``GET /v1/model`` and the demo controls (``PUT /v1/nodes/{name}/slowdown``,
``POST /v1/nodes/{name}/fault``): listed in ``GET /v1/pipeline``, behind the token."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.web import FakePipeline
from web.app import WebSettings, create_app


def test_model_lists_the_cut_sizes() -> None:
    with TestClient(create_app(FakePipeline())) as client:
        body = client.get("/v1/model").json()
    assert body["model_id"] == "fake_net" and body["blocks"] == 4
    assert [(c["index"], c["bytes"]) for c in body["cut_points"]] == [(0, 192), (4, 40)]
    assert body["preprocessing"]["crop"] == 4 and body["labels"] == 10


def test_the_pipeline_lists_its_controls_and_faults_reach_it() -> None:
    fake = FakePipeline()
    with TestClient(create_app(fake)) as client:
        assert client.get("/v1/pipeline").json()["controls"] == [
            "slowdown", "kill", "pause", "resume", "cut"]
        response = client.post("/v1/nodes/worker-1/fault", json={"action": "pause"})
        assert response.status_code == 200, response.text
        assert response.json()["action"] == "pause"
        states = {n["name"]: n["state"] for n in client.get("/v1/pipeline").json()["nodes"]}
    assert fake.faults == [("worker-1", "pause", 3.0)]
    assert states["worker-1"] == "down"


def test_controls_need_the_token_when_one_is_set() -> None:
    fake = FakePipeline()
    with TestClient(create_app(fake, settings=WebSettings(api_token="t"))) as client:
        assert client.put("/v1/nodes/worker-1/slowdown", json={"factor": 4}).status_code == 401
        client.post("/v1/session", headers={"Authorization": "Bearer t"})
        # the page's cookie opens reads, never a control
        assert client.put("/v1/nodes/worker-1/slowdown", json={"factor": 4}).status_code == 401
        assert client.post("/v1/nodes/worker-1/fault", json={"action": "kill"}).status_code == 401
        response = client.put("/v1/nodes/worker-1/slowdown", json={"factor": 4},
                              headers={"Authorization": "Bearer t"})
        assert response.status_code == 200
    assert fake.slowdowns == [("worker-1", 4.0)] and fake.faults == []
