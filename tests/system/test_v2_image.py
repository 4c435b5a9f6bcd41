"""``<model>_image`` over the Open Inference Protocol on the real efficientnet_lite0: a v2
client sending JPEG bytes gets the same top-1 as ``/v1/classify`` for scikit-image's photos,
and the tensor model's published preprocessing reproduces the server's own."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from engines.manifest import Preprocessing
from engines.preprocess import decode_image, preprocess
from tests.conftest import BuiltModel
from tests.system.conftest import cluster
from web.app import create_app

skimage_data = pytest.importorskip("skimage.data")

MODEL = "efficientnet_lite0"
HEADER = "Inference-Header-Content-Length"
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")


def jpeg(name: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(getattr(skimage_data, name)()).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def binary_bytes_request(images: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """What a Triton/KServe client sends for a BYTES tensor with binary data."""
    raw = b"".join(len(image).to_bytes(4, "little") + image for image in images)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES",
                                     "shape": [len(images)],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + raw, {HEADER: str(len(header)), "Content-Type": "application/octet-stream"}


def test_image_model_agrees_with_classify_on_photos(lite_repo: BuiltModel,
                                                    tmp_path: Path) -> None:
    images = [jpeg(name) for name in PHOTOS]
    with cluster(lite_repo.repo, MODEL, tmp_path, nodes=1) as source, \
            TestClient(create_app(source)) as client:
        classify_top1 = []
        for image in images:
            response = client.post("/v1/classify", files={"file": ("p.jpg", image)})
            assert response.status_code == 200, response.text
            classify_top1.append(response.json()["top"][0]["index"])

        body, headers = binary_bytes_request(images)
        response = client.post(f"/v2/models/{MODEL}_image/infer", content=body, headers=headers)
        assert response.status_code == 200, response.text
        length = int(response.headers[HEADER])
        doc = json.loads(response.content[:length])
        assert doc["model_name"] == f"{MODEL}_image"
        scores = np.frombuffer(response.content[length:], "<f4").reshape(doc["outputs"][0]["shape"])

        as_json = client.post(f"/v2/models/{MODEL}_image/infer", json={"inputs": [{
            "name": "image", "datatype": "BYTES", "shape": [1],
            "data": [base64.b64encode(images[0]).decode()]}]})
        assert as_json.status_code == 200, as_json.text
        json_scores = np.asarray(as_json.json()["outputs"][0]["data"])

        # a client that preprocesses by the published parameters sends the model's input
        params = client.get(f"/v2/models/{MODEL}").json()["parameters"]
    tensor = preprocess(Image.open(io.BytesIO(images[0])).convert("RGB"), Preprocessing(
        resize=params["resize"], crop=params["crop"], layout=params["layout"],
        mean=tuple(params["mean"]), std=tuple(params["std"])))
    np.testing.assert_array_equal(
        tensor, preprocess(decode_image(images[0]), lite_repo.manifest.preprocessing))

    assert scores.shape == (len(PHOTOS), 1000)
    assert list(scores.argmax(axis=1)) == classify_top1
    assert 281 <= classify_top1[0] <= 285  # chelsea is a cat
    np.testing.assert_allclose(json_scores, scores[0], rtol=1e-5, atol=1e-5)
