"""``GET /v1/model`` and the demo controls: the slowdown every pipeline takes
(``PUT /v1/nodes/{name}/slowdown``), and fault injection (``POST /v1/nodes/{name}/fault``),
501 from a runtime without it, working through ``appliance.api.FaultInjection`` where the
pipeline implements it."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.web import FakePipeline, FaultyFakePipeline
from web.app import WebSettings, create_app


def test_model_lists_the_cut_sizes() -> None:
    with TestClient(create_app(FakePipeline())) as client:
        body = client.get("/v1/model").json()
    assert body["model_id"] == "fake_net" and body["blocks"] == 4
    assert [(c["index"], c["bytes"]) for c in body["cut_points"]] == [(0, 192), (4, 40)]
    assert body["preprocessing"]["crop"] == 4 and body["labels"] == 10


def test_without_fault_injection_the_endpoint_says_so() -> None:
    with TestClient(create_app(FakePipeline())) as client:
        assert client.get("/v1/pipeline").json()["controls"] == ["slowdown"]
        response = client.post("/v1/nodes/worker-1/fault", json={"action": "kill"})
        assert response.status_code == 501
        assert "no fault injection" in response.json()["detail"]


def test_faults_reach_the_pipeline() -> None:
    fake = FaultyFakePipeline()
    with TestClient(create_app(fake)) as client:
        assert client.get("/v1/pipeline").json()["controls"] == [
            "slowdown", "kill", "pause", "resume", "cut"]
        response = client.post("/v1/nodes/worker-1/fault", json={"action": "pause"})
        assert response.status_code == 200 and response.json() == {"node": "worker-1",
                                                                    "action": "pause"}
        assert client.post("/v1/nodes/nobody/fault", json={"action": "kill"}).status_code == 404
        assert client.post("/v1/nodes/worker-1/fault",
                           json={"action": "explode"}).status_code == 422
        states = {n["name"]: n["state"] for n in client.get("/v1/pipeline").json()["nodes"]}
    assert fake.faults == [("worker-1", "pause")]
    assert states["worker-1"] == "down"


def test_controls_need_the_token_when_one_is_set() -> None:
    fake = FaultyFakePipeline()
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
