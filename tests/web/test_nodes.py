"""``GET /v1/model`` and the demo controls (``PUT /v1/nodes/{name}/slowdown``,
``POST /v1/nodes/{name}/fault``): 501 from a runtime without them, working through
``appliance.api.NodeControls`` where the pipeline implements it."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.web import ControllableFakePipeline, FakePipeline
from web.app import WebSettings, create_app


def test_model_lists_the_cut_sizes() -> None:
    with TestClient(create_app(FakePipeline())) as client:
        body = client.get("/v1/model").json()
    assert body["model_id"] == "fake_net" and body["blocks"] == 4
    assert [(c["index"], c["bytes"]) for c in body["cut_points"]] == [(0, 192), (4, 40)]
    assert body["preprocessing"]["crop"] == 4 and body["labels"] == 10


def test_without_controls_the_endpoints_say_so() -> None:
    with TestClient(create_app(FakePipeline())) as client:
        assert client.get("/v1/pipeline").json()["controls"] == []
        response = client.put("/v1/nodes/worker-1/slowdown", json={"factor": 4})
        assert response.status_code == 501
        assert "no slowdown control" in response.json()["detail"]
        assert client.post("/v1/nodes/worker-1/fault",
                           json={"action": "kill"}).status_code == 501


def test_controls_reach_the_pipeline() -> None:
    fake = ControllableFakePipeline()
    with TestClient(create_app(fake)) as client:
        assert client.get("/v1/pipeline").json()["controls"] == [
            "slowdown", "kill", "pause", "resume", "cut"]
        response = client.put("/v1/nodes/worker-1/slowdown", json={"factor": 4})
        assert response.status_code == 200 and response.json() == {"node": "worker-1",
                                                                    "factor": 4.0}
        assert client.post("/v1/nodes/worker-1/fault",
                           json={"action": "pause"}).status_code == 200
        assert client.put("/v1/nodes/nobody/slowdown", json={"factor": 2}).status_code == 404
        assert client.put("/v1/nodes/worker-1/slowdown", json={"factor": 0.5}).status_code == 422
        assert client.post("/v1/nodes/worker-1/fault",
                           json={"action": "explode"}).status_code == 422
        states = {n["name"]: n["state"] for n in client.get("/v1/pipeline").json()["nodes"]}
    assert fake.controlled == [("worker-1", "slowdown", 4.0), ("worker-1", "pause", None)]
    assert states["worker-1"] == "down"


def test_controls_need_the_token_when_one_is_set() -> None:
    fake = ControllableFakePipeline()
    with TestClient(create_app(fake, settings=WebSettings(api_token="t"))) as client:
        assert client.put("/v1/nodes/worker-1/slowdown", json={"factor": 4}).status_code == 401
        client.post("/v1/session", headers={"Authorization": "Bearer t"})
        # the page's cookie opens reads, never a control
        assert client.put("/v1/nodes/worker-1/slowdown", json={"factor": 4}).status_code == 401
        response = client.put("/v1/nodes/worker-1/slowdown", json={"factor": 4},
                              headers={"Authorization": "Bearer t"})
        assert response.status_code == 200
    assert fake.controlled == [("worker-1", "slowdown", 4.0)]
