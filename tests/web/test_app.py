"""The HTTP layer against ``FakePipeline``: every endpoint, every error mapping, the v2 wire
format (JSON and binary tensors, bytes built by hand from the spec), limits, metrics, SSE."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry

from appliance.api import NotReadyError, PipelineError, QueueFullError, RequestTimeoutError
from engines.errors import InputSpecError
from tests.web import CLASSES, INPUT_SHAPE, MODEL_ID, FakePipeline, fake_scores
from web.app import WebSettings, create_app
from web.routers.pipeline import sse_stream

INFER = f"/v2/models/{MODEL_ID}/infer"
HEADER = "Inference-Header-Content-Length"


def image_bytes(fmt: str = "PNG", color: tuple[int, int, int] = (30, 60, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buffer, format=fmt)
    return buffer.getvalue()


def batch(n: int) -> np.ndarray:
    """n different samples, so a test can tell them apart in the output."""
    base = np.random.default_rng(0).standard_normal((n, *INPUT_SHAPE[1:]))
    return (base + np.arange(n)[:, None, None, None]).astype(np.float32)


def expected_scores(x: np.ndarray) -> np.ndarray:
    return np.concatenate([fake_scores(sample[None]) for sample in x])


def binary_request(x: np.ndarray, outputs: list[dict[str, Any]] | None = None,
                   **request_params: Any) -> tuple[bytes, dict[str, str]]:
    """An infer request as the binary tensor data extension spells it."""
    raw = x.astype("<f4").tobytes()
    doc: dict[str, Any] = {"inputs": [{"name": "input", "shape": list(x.shape),
                                       "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(raw)}}]}
    if outputs is not None:
        doc["outputs"] = outputs
    if request_params:
        doc["parameters"] = request_params
    header = json.dumps(doc).encode()
    return header + raw, {HEADER: str(len(header)), "Content-Type": "application/octet-stream"}


def split_binary_response(response: Any) -> tuple[dict[str, Any], bytes]:
    length = int(response.headers[HEADER])
    return json.loads(response.content[:length]), response.content[length:]


# --- status page and /v1/classify -------------------------------------------------------------


def test_index_serves_the_status_page(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    script = client.get("/static/app.js")
    assert script.status_code == 200
    for needle in ("/v1/pipeline", "/v1/classify", "/v1/events", "/v1/model", "/v1/session"):
        assert needle in script.text
    # Everything the page loads is served from here: it works offline on a LAN (no CDN).
    loaded = re.findall(r'(?:src|href)="([^"]+)"', response.text)
    assert {"/static/app.js", "/static/app.css", "/static/vendor/uplot-1.6.32.min.js",
            "/static/vendor/uplot-1.6.32.min.css"} <= set(loaded)
    for url in loaded:
        if url.startswith("/static/"):
            assert client.get(url).status_code == 200, url
        else:
            assert url == "/v1/events", url  # the link to the raw event stream
    for text in (response.text, script.text, client.get("/static/app.css").text):
        assert "http://" not in text and "https://" not in text
    licence = client.get("/static/vendor/uplot-LICENSE.txt")
    assert licence.status_code == 200 and "MIT" in licence.text


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_classify_returns_top_k_and_path(client: TestClient, fmt: str) -> None:
    response = client.post("/v1/classify", files={"file": ("x.img", image_bytes(fmt))})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"request_id", "top", "latency_ms", "path", "attempts"}
    assert len(body["top"]) == 5
    assert set(body["top"][0]) == {"index", "label", "score"}
    assert body["top"][0]["label"] == f"class_{body['top'][0]['index']}"
    assert body["path"] == [{"node": "source", "blocks": [0, 2], "ms": 1.5},
                            {"node": "worker-1", "blocks": [2, 4], "ms": 2.5}]


def test_classify_top_k(client: TestClient) -> None:
    response = client.post("/v1/classify", params={"top_k": 3},
                           files={"file": ("x.png", image_bytes())})
    assert len(response.json()["top"]) == 3


@pytest.mark.parametrize("top_k", [0, 21, "many"])
def test_classify_rejects_bad_top_k(client: TestClient, top_k: object) -> None:
    response = client.post("/v1/classify", params={"top_k": top_k},
                           files={"file": ("x.png", image_bytes())})
    assert response.status_code == 422


def test_classify_needs_a_file(client: TestClient) -> None:
    assert client.post("/v1/classify").status_code == 422


def test_corrupt_image_is_400(client: TestClient) -> None:
    corrupt = image_bytes()[:40]  # a PNG signature, then nothing readable
    response = client.post("/v1/classify", files={"file": ("x.png", corrupt, "image/png")})
    assert response.status_code == 400
    assert "not a readable image" in response.json()["detail"]


def test_not_an_image_is_415(client: TestClient) -> None:
    response = client.post("/v1/classify", files={"file": ("notes.txt", b"hello, world")})
    assert response.status_code == 415
    assert "not a JPEG, PNG or WebP image" in response.json()["detail"]


def test_empty_upload_is_400(client: TestClient) -> None:
    response = client.post("/v1/classify", files={"file": ("x.png", b"")})
    assert response.status_code == 400
    assert "empty" in response.json()["detail"]


def test_oversize_image_is_413(client: TestClient, fake: FakePipeline) -> None:
    limit = WebSettings().max_image_bytes
    big = image_bytes() + bytes(limit)
    response = client.post("/v1/classify", files={"file": ("big.png", big)})
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]
    assert fake.calls == 0


def test_oversize_body_is_413_before_it_is_parsed(fake: FakePipeline) -> None:
    app = create_app(fake, settings=WebSettings(max_body_bytes=1000))
    with TestClient(app) as small:
        response = small.post("/v1/classify", files={"file": ("x.png", bytes(2000))})
        assert response.status_code == 413
        assert "limit of 1000 bytes" in response.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
            yield b"{" + b" " * 800
            yield b" " * 800 + b"}"

        response = small.post(INFER, content=chunks())
        assert response.status_code == 413
        assert "limit of 1000 bytes" in response.json()["error"]
        response = small.post("/v1/classify", content=chunks(),
                              headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert response.status_code == 413  # not the 400 of the interrupted form parser
    assert fake.calls == 0


ERRORS = [
    (QueueFullError("3 requests in flight; the limit is 3"), 503),
    (NotReadyError("no live path through blocks 2..4"), 503),
    (RequestTimeoutError("no result within 5 s"), 504),
    (PipelineError("worker-1 failed"), 502),
    (InputSpecError("expected (1, 3, 4, 4)"), 400),
]


@pytest.mark.parametrize(("error", "status"), ERRORS)
def test_classify_maps_pipeline_errors(client: TestClient, fake: FakePipeline,
                                       error: Exception, status: int) -> None:
    fake.fail = error
    response = client.post("/v1/classify", files={"file": ("x.png", image_bytes())})
    assert response.status_code == status
    assert response.json() == {"detail": str(error)}
    assert (response.headers.get("retry-after") == "1") == isinstance(error, QueueFullError)


# --- /v1/pipeline and /v1/events --------------------------------------------------------------


def test_pipeline_status(client: TestClient) -> None:
    response = client.get("/v1/pipeline")
    assert response.status_code == 200
    body = response.json()
    assert body["model_id"] == MODEL_ID and body["ready"] is True
    assert [(n["name"], n["start"], n["end"], n["state"]) for n in body["nodes"]] == [
        ("source", 0, 2, "up"), ("worker-1", 2, 4, "slow")]
    assert body["nodes"][0]["stage_ms"] == 1.5 and body["nodes"][1]["stage_ms"] is None
    assert body["latency_p99_ms"] is None  # NaN is not JSON
    assert body["boundaries"] == [0, 2, 4] and body["counters"] == {"boundary_moves": 3}


def test_events_stream(client: TestClient) -> None:
    with client.stream("GET", "/v1/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [json.loads(line[len("data: "):]) for line in response.iter_lines()
                if line.startswith("data: ")]
    assert data == [{"type": "boundary_moved", "boundaries": [0, 2, 4]},
                    {"type": "node_down", "node": "worker-1"}]


def test_sse_stream_keeps_alive_and_closes_the_source() -> None:
    closed = asyncio.Event()

    async def slow_source() -> AsyncIterator[dict[str, Any]]:
        try:
            yield {"n": 1}
            await asyncio.sleep(0.25)
            yield {"n": 2}
            await asyncio.sleep(3600)
            yield {"n": 3}
        finally:
            closed.set()

    async def main() -> list[str]:
        frames: list[str] = []
        stream = sse_stream(slow_source(), keepalive_s=0.05)
        async for frame in stream:
            frames.append(frame)
            if frame.startswith('data: {"n": 2}'):
                break
        await stream.aclose()  # the client went away while the source waits
        assert closed.is_set()
        return frames

    frames = asyncio.run(main())
    assert frames[0] == ": connected\n\n"
    assert frames[1] == 'data: {"n": 1}\n\n'
    assert ": keep-alive\n\n" in frames[2:-1]
    assert frames[-1] == 'data: {"n": 2}\n\n'


# --- /metrics ---------------------------------------------------------------------------------


def test_metrics(client: TestClient) -> None:
    client.post("/v1/classify", files={"file": ("x.png", image_bytes())})
    client.post("/v1/classify", files={"file": ("x.txt", b"text")})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for line in (
        'armdi_http_requests_total{endpoint="/v1/classify",status="200"} 1.0',
        'armdi_http_requests_total{endpoint="/v1/classify",status="415"} 1.0',
        'armdi_http_request_duration_seconds_count{endpoint="/v1/classify"} 2.0',
        "armdi_http_requests_in_flight 1.0",  # the scrape itself
        'armdi_pipeline_ready{model="fake_net"} 1.0',
        'armdi_pipeline_completed_total{model="fake_net"} 7.0',
        'armdi_pipeline_failed_total{model="fake_net"} 1.0',
        'armdi_pipeline_retried_total{model="fake_net"} 2.0',
        'armdi_pipeline_throughput_per_second{model="fake_net"} 12.5',
        'armdi_pipeline_latency_ms{model="fake_net",quantile="0.5"} 4.0',
        'armdi_node_stage_ms{model="fake_net",node="source"} 1.5',
        'armdi_node_queue_depth{model="fake_net",node="source"} 1.0',
        'armdi_node_queue_capacity{model="fake_net",node="worker-1"} 8.0',
        'armdi_node_state{model="fake_net",node="worker-1",state="slow"} 1.0',
        'armdi_node_block_start{model="fake_net",node="worker-1"} 2.0',
    ):
        assert line in text, line


def test_each_app_has_its_own_registry(fake: FakePipeline) -> None:
    registry = CollectorRegistry()
    with TestClient(create_app(fake)) as one, \
            TestClient(create_app(fake, metrics_registry=registry)) as two:
        one.get("/v2/health/live")
        assert "/v2/health/live" in one.get("/metrics").text
        assert "/v2/health/live" not in two.get("/metrics").text
    assert registry.get_sample_value("armdi_http_requests_total",
                                     {"endpoint": "/metrics", "status": "200"}) == 1.0


# --- Open Inference Protocol: health and metadata ---------------------------------------------


def test_v2_health(client: TestClient, fake: FakePipeline) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get(f"/v2/models/{MODEL_ID}/ready").status_code == 200
    fake.is_ready = False
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get(f"/v2/models/{MODEL_ID}/ready").status_code == 503


def test_v2_server_metadata(client: TestClient) -> None:
    body = client.get("/v2").json()
    assert body["name"] == "armdi"
    assert isinstance(body["version"], str) and body["version"]
    assert body["extensions"] == ["binary_tensor_data"]


@pytest.mark.parametrize("path", [f"/v2/models/{MODEL_ID}", f"/v2/models/{MODEL_ID}/versions/1"])
def test_v2_model_metadata(client: TestClient, path: str) -> None:
    body = client.get(path).json()
    assert body == {
        "name": MODEL_ID, "versions": ["1"], "platform": "armdi",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 4, 4]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, CLASSES]}],
        # the preprocessing, for clients that send tensors (fake_manifest's: resize 4, crop 4)
        "parameters": {"resize": 4, "crop": 4, "interpolation": "bilinear", "color": "RGB",
                       "scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
                       "std": [0.229, 0.224, 0.225], "layout": "NCHW", "dtype": "float32",
                       "image_model": f"{MODEL_ID}_image"},
    }


@pytest.mark.parametrize("path", [
    "/v2/models/resnet50", "/v2/models/resnet50/ready", "/v2/models/resnet50/infer",
    f"/v2/models/{MODEL_ID}/versions/7", f"/v2/models/{MODEL_ID}/versions/7/infer",
])
def test_v2_unknown_model_is_404(client: TestClient, path: str) -> None:
    method = "POST" if path.endswith("infer") else "GET"
    response = client.request(method, path, json={})
    assert response.status_code == 404
    assert set(response.json()) == {"error"}


def test_v2_unknown_route_uses_v2_error_body(client: TestClient) -> None:
    response = client.get("/v2/nothing/here")
    assert response.status_code == 404 and "error" in response.json()


# --- Open Inference Protocol: infer -----------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_v2_json_infer(client: TestClient, nested: bool) -> None:
    x = batch(6)  # more samples than are sent into the pipeline at once
    data = x.tolist() if nested else x.reshape(-1).tolist()
    response = client.post(INFER, json={
        "id": "req-1",
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}],
    })
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert HEADER not in response.headers
    body = response.json()
    assert body["model_name"] == MODEL_ID and body["id"] == "req-1"
    [output] = body["outputs"]
    assert output["name"] == "output" and output["datatype"] == "FP32"
    assert output["shape"] == [6, CLASSES]
    np.testing.assert_allclose(np.asarray(output["data"]).reshape(6, CLASSES),
                               expected_scores(x), rtol=1e-6)


@pytest.mark.parametrize("how", ["request", "output"])
def test_v2_binary_infer_round_trip(client: TestClient, how: str) -> None:
    x = batch(3)
    if how == "request":
        body, headers = binary_request(x, binary_data_output=True)
    else:
        body, headers = binary_request(x, outputs=[{"name": "output",
                                                    "parameters": {"binary_data": True}}])
    response = client.post(f"/v2/models/{MODEL_ID}/versions/1/infer", content=body,
                           headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    doc, raw = split_binary_response(response)
    [output] = doc["outputs"]
    assert output["shape"] == [3, CLASSES] and output["datatype"] == "FP32"
    assert "data" not in output
    assert output["parameters"]["binary_data_size"] == len(raw) == 3 * CLASSES * 4
    y = np.frombuffer(raw, dtype="<f4").reshape(output["shape"])
    np.testing.assert_allclose(y, expected_scores(x), rtol=1e-6)


def test_v2_binary_input_json_output(client: TestClient) -> None:
    x = batch(1)
    body, headers = binary_request(x, outputs=[{"name": "output"}])
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert HEADER not in response.headers
    np.testing.assert_allclose(response.json()["outputs"][0]["data"],
                               expected_scores(x).reshape(-1), rtol=1e-6)


def test_v2_gzip_request(client: TestClient) -> None:
    x = batch(2)
    body, headers = binary_request(x, binary_data_output=True)
    response = client.post(INFER, content=gzip.compress(body),
                           headers={**headers, "Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    _, raw = split_binary_response(response)
    np.testing.assert_allclose(np.frombuffer(raw, "<f4").reshape(2, CLASSES),
                               expected_scores(x), rtol=1e-6)


def _json_input(**overrides: Any) -> dict[str, Any]:
    tensor = {"name": "input", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0.5] * 48}
    return {"inputs": [{**tensor, **overrides}]}


@pytest.mark.parametrize(("request_json", "message"), [
    (_json_input(datatype="FP16"), "send FP32"),
    (_json_input(datatype="INT8"), "send FP32"),
    (_json_input(shape=[1, 3, 5, 5], data=[0.5] * 75), "does not match [-1, 3, 4, 4]"),
    (_json_input(shape=[3, 4, 4]), "does not match"),
    (_json_input(shape=[0, 3, 4, 4], data=[]), "does not match"),
    (_json_input(shape="1x3x4x4"), "list of integers"),
    (_json_input(data=[0.5] * 47), "needs 48 values, data has 47"),
    (_json_input(data=["a"] * 48), "not a list of numbers"),
    (_json_input(data=[[0.5] * 40, [0.5] * 8]), "not a list of numbers"),
    (_json_input(name="pixels"), "unknown input 'pixels'"),
    ({"inputs": [_json_input()["inputs"][0]] * 2}, "exactly one input"),
    ({"inputs": []}, "exactly one input"),
    ({**_json_input(), "outputs": [{"name": "probs"}]}, "unknown output 'probs'"),
    ({**_json_input(), "outputs": [{"name": "output", "parameters": {"classification": 3}}]},
     "classification extension"),
    ({**_json_input(), "parameters": {"binary_data_output": "yes"}}, "true or false"),
    ({"inputs": [{"name": "input", "shape": [1, 3, 4, 4], "datatype": "FP32"}]}, "neither"),
    ([1, 2, 3], "JSON object"),
])
def test_v2_bad_json_requests_are_400(client: TestClient, request_json: Any,
                                      message: str) -> None:
    response = client.post(INFER, json=request_json)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_v2_bad_binary_requests_are_400(client: TestClient, fake: FakePipeline) -> None:
    x = batch(1)
    body, headers = binary_request(x)
    length = int(headers[HEADER])
    cases = [
        (body + b"\0\0\0\0", headers, "add up to 192"),  # trailing bytes
        (body[:-4], headers, "only 188 bytes follow"),
        (body, {HEADER: str(len(body) + 1)}, "body has only"),
        (body, {HEADER: "twelve"}, "must be an integer"),
        (body, {HEADER: "-1"}, "must not be negative"),
        (body, {}, "not valid JSON"),  # binary data without the header
        (body[:length], {HEADER: str(length - 1)}, "not valid JSON"),
        (b"\x00" * 10, {"Content-Encoding": "gzip"}, "not valid gzip"),
    ]
    for content, request_headers, message in cases:
        response = client.post(INFER, content=content, headers=request_headers)
        assert response.status_code == 400, (message, response.text)
        assert message in response.json()["error"], (message, response.text)
    doc = json.loads(body[:length])
    doc["inputs"][0]["parameters"]["binary_data_size"] = 100
    header = json.dumps(doc).encode()
    response = client.post(INFER, content=header + body[length:],
                           headers={HEADER: str(len(header))})
    assert response.status_code == 400
    assert "is 192 bytes, but binary_data_size is 100" in response.json()["error"]
    assert client.post(INFER, content=body, headers={HEADER: str(length),
                                                     "Content-Encoding": "br"}).status_code == 415
    assert fake.calls == 0


@pytest.mark.parametrize(("error", "status"), ERRORS)
def test_v2_infer_maps_pipeline_errors(client: TestClient, fake: FakePipeline,
                                       error: Exception, status: int) -> None:
    fake.fail = error
    response = client.post(INFER, json=_json_input(shape=[2, 3, 4, 4], data=[0.5] * 96))
    assert response.status_code == status
    assert response.json() == {"error": str(error)}
    assert (response.headers.get("retry-after") == "1") == isinstance(error, QueueFullError)


def test_put_slowdown_reaches_the_pipeline(client: TestClient, fake: FakePipeline) -> None:
    response = client.put("/v1/nodes/worker-1/slowdown", json={"factor": 4.0})
    assert response.status_code == 200, response.text
    assert response.json() == {"node": "worker-1", "slowdown": 4.0}
    assert fake.slowdowns == [("worker-1", 4.0)]


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/v1/nodes/nobody/slowdown", {"factor": 2.0}, 404),
    ("/v1/nodes/worker-1/slowdown", {"factor": 0.5}, 422),
    ("/v1/nodes/worker-1/slowdown", {"factor": "fast"}, 422),
    ("/v1/nodes/worker-1/slowdown", {}, 422),
])
def test_bad_slowdowns_are_refused(client: TestClient, fake: FakePipeline, path: str,
                                   body: dict[str, object], status: int) -> None:
    response = client.put(path, json=body)
    assert response.status_code == status, response.text
    body = response.json()
    assert body.get("error") or body.get("detail"), body  # a message says what was wrong
    assert fake.slowdowns == []
