"""``<model>_image`` over the Open Inference Protocol: encoded images as a ``BYTES`` tensor,
in the binary extension (4-byte little-endian length, then the bytes, per element) and in
JSON (base64), against ``FakePipeline``."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.web import CLASSES, MODEL_ID, FakePipeline, fake_scores

IMAGE_MODEL = f"{MODEL_ID}_image"
INFER = f"/v2/models/{IMAGE_MODEL}/infer"
HEADER = "Inference-Header-Content-Length"


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buffer, format="PNG")
    return buffer.getvalue()


def bytes_tensor(elements: list[bytes]) -> bytes:
    """The binary extension's BYTES serialisation, written from the spec."""
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def binary_image_request(images: list[bytes], **tensor: Any) -> tuple[bytes, dict[str, str]]:
    raw = bytes_tensor(images)
    doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                       "parameters": {"binary_data_size": len(raw)}, **tensor}],
           "outputs": [{"name": "output", "parameters": {"binary_data": False}}]}
    header = json.dumps(doc).encode()
    return header + raw, {HEADER: str(len(header)), "Content-Type": "application/octet-stream"}


def expected(fake: FakePipeline, images: list[bytes]) -> np.ndarray:
    return np.concatenate([fake_scores(fake.prepare_image(image)) for image in images])


def test_image_model_metadata(client: TestClient) -> None:
    body = client.get(f"/v2/models/{IMAGE_MODEL}").json()
    assert body == {
        "name": IMAGE_MODEL, "versions": ["1"], "platform": "armdi",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, CLASSES]}],
        "parameters": {"tensor_model": MODEL_ID, "formats": "jpeg,png,webp"},
    }
    ready = client.get(f"/v2/models/{IMAGE_MODEL}/versions/1/ready")
    assert ready.status_code == 200 and ready.json() == {"name": IMAGE_MODEL, "ready": True}


def test_binary_bytes_tensor_returns_the_scores_of_each_image(client: TestClient,
                                                              fake: FakePipeline) -> None:
    images = [png((200, 10, 10)), png((10, 10, 200)), png((90, 90, 90))]
    body, headers = binary_image_request(images)
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["model_name"] == IMAGE_MODEL
    (output,) = doc["outputs"]
    assert output["shape"] == [3, CLASSES]
    np.testing.assert_allclose(np.asarray(output["data"]).reshape(3, CLASSES),
                               expected(fake, images), rtol=1e-6)


def test_binary_output_and_request_id(client: TestClient, fake: FakePipeline) -> None:
    images = [png((1, 2, 3))]
    raw = bytes_tensor(images)
    header = json.dumps({"id": "r7", "inputs": [{"name": "image", "datatype": "BYTES",
                                                  "shape": [1, 1],
                                                  "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    response = client.post(INFER, content=header + raw, headers={HEADER: str(len(header))})
    assert response.status_code == 200, response.text
    length = int(response.headers[HEADER])
    doc = json.loads(response.content[:length])
    assert doc["id"] == "r7" and doc["outputs"][0]["parameters"]["binary_data_size"] == 4 * CLASSES
    scores = np.frombuffer(response.content[length:], "<f4").reshape(1, CLASSES)
    np.testing.assert_allclose(scores, expected(fake, images), rtol=1e-6)


def test_json_base64_images(client: TestClient, fake: FakePipeline) -> None:
    images = [png((250, 250, 250)), png((0, 0, 0))]
    response = client.post(INFER, json={"inputs": [{
        "name": "image", "datatype": "BYTES", "shape": [2],
        "data": [base64.b64encode(image).decode() for image in images]}]})
    assert response.status_code == 200, response.text
    data = np.asarray(response.json()["outputs"][0]["data"]).reshape(2, CLASSES)
    np.testing.assert_allclose(data, expected(fake, images), rtol=1e-6)


@pytest.mark.parametrize(("tensor", "needle"), [
    ({"name": "input", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}, "unknown input"),
    ({"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}, "BYTES"),
    ({"name": "image", "datatype": "BYTES", "shape": [2], "data": ["aGk="]}, "2 base64"),
    ({"name": "image", "datatype": "BYTES", "shape": [1, 3], "data": ["aGk="]}, "shape"),
    ({"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}, "not base64"),
    ({"name": "image", "datatype": "BYTES", "shape": [1], "data": [7]}, "base64 strings"),
    ({"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]},
     "element 0: not a readable image"),
    ({"name": "image", "datatype": "BYTES", "shape": [1000], "data": []}, "at most"),
])
def test_bad_json_image_requests_are_400(client: TestClient, fake: FakePipeline,
                                         tensor: dict[str, Any], needle: str) -> None:
    response = client.post(INFER, json={"inputs": [tensor]})
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]
    assert fake.calls == 0


def test_bad_binary_image_requests_are_400(client: TestClient) -> None:
    good = bytes_tensor([png((5, 5, 5))])
    cases = [
        (good[:-3], len(good), "binary_data_size"),  # says more than there is
        (good[:2], 2, "ends before element 0's length"),
        (good[:-3], len(good) - 3, "only"),  # an element longer than the data
        (good + b"\0", len(good) + 1, "left after 1 elements"),
    ]
    for raw, size, needle in cases:
        header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": size}}]}).encode()
        response = client.post(INFER, content=header + raw, headers={HEADER: str(len(header))})
        assert response.status_code == 400, (needle, response.text)
        assert needle in response.json()["error"], (needle, response.json())
