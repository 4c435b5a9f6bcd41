"""The Open Inference Protocol (KServe v2) over REST, with the binary tensor data extension.

Health, server and model metadata, and ``infer`` with tensors as JSON or as raw little-endian
bytes after the JSON header (``Inference-Header-Content-Length``), as Triton and KServe
clients send them. The model is served as version ``"1"``; a batch of N is N pipeline requests,
a few in flight at once, concatenated. Errors on ``/v2`` are ``{"error": message}`` bodies
(``web.app`` formats them).

Two model names are served. ``<model>`` takes the preprocessed FP32 tensor; its metadata
publishes the preprocessing (resize, crop, mean, std, layout) as ``parameters``.
``<model>_image`` takes encoded images (JPEG, PNG, WebP) as a ``BYTES`` tensor of shape [N],
as Triton ensembles with a preprocessing step take them, and returns the same class scores:
in the binary extension each element is a 4-byte little-endian length and the bytes; in JSON
each element is the image in base64.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from appliance.api import Pipeline
from engines.errors import InputSpecError
from engines.manifest import Manifest, TensorInfo
from web.limits import check_batch
from web.routers import PipelineDep, SettingsDep, server_version

router = APIRouter(prefix="/v2", tags=["v2"])
T = TypeVar("T")

HEADER_LENGTH = "Inference-Header-Content-Length"
MODEL_VERSION = "1"
PLATFORM = "armdi"
# Samples of one batch in the pipeline at once: enough to keep every stage busy, few enough
# not to fill a node's queue on behalf of a single request.
SAMPLES_IN_FLIGHT = 4
# manifest dtype -> v2 datatype; only FP32 is accepted on the wire.
DATATYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64",
             "int32": "INT32", "uint8": "UINT8", "int8": "INT8", "bool": "BOOL"}
IMAGE_SUFFIX = "_image"
IMAGE_INPUT = "image"
# Images of one request: each is decoded and run as its own pipeline request.
MAX_IMAGES = 64


def _bad_request(message: str) -> HTTPException:
    return HTTPException(400, message)


def _manifest_for(pipeline: Pipeline, model: str, version: str | None) -> tuple[Manifest, bool]:
    """The served manifest, and whether ``model`` names its image model."""
    manifest = pipeline.manifest
    names = (manifest.model_id, manifest.model_id + IMAGE_SUFFIX)
    if model not in names:
        raise HTTPException(404, f"unknown model '{model}': this server serves "
                                 f"'{names[0]}' (tensors) and '{names[1]}' (encoded images)")
    if version is not None and version != MODEL_VERSION:
        raise HTTPException(404, f"model '{model}' has no version '{version}' "
                                 f"(versions: {MODEL_VERSION})")
    return manifest, model == names[1]


def _tensor_metadata(info: TensorInfo) -> dict[str, Any]:
    return {"name": info.name, "datatype": DATATYPES.get(info.dtype, info.dtype.upper()),
            "shape": [-1, *info.shape[1:]]}


def preprocessing_parameters(manifest: Manifest) -> dict[str, Any]:
    """How an image becomes the tensor model's input, for clients that preprocess themselves:
    RGB, short side resized to ``resize`` (bilinear), centre crop ``crop``, pixels scaled to
    [0, 1], minus ``mean``, divided by ``std``, in ``layout``; a non-square crop (``crop``
    high, ``crop_width`` wide) resizes the image so that it covers the crop."""
    prep = manifest.preprocessing
    out: dict[str, Any] = {
        "resize": prep.resize, "crop": prep.crop, "interpolation": "bilinear",
        "color": "RGB", "scale": 1 / 255, "mean": list(prep.mean), "std": list(prep.std),
        "layout": prep.layout, "dtype": prep.dtype,
        "image_model": manifest.model_id + IMAGE_SUFFIX}
    if prep.crop_width is not None:
        out["crop_width"] = prep.crop_width
    return out


# --- handlers --------------------------------------------------------------------------------


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": "armdi", "version": server_version(), "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def ready(pipeline: PipelineDep) -> JSONResponse:
    is_ready = pipeline.ready()
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/models/{model}")
@router.get("/models/{model}/versions/{version}")
async def model_metadata(model: str, pipeline: PipelineDep,
                         version: str | None = None) -> dict[str, Any]:
    manifest, image = _manifest_for(pipeline, model, version)
    if image:
        return {"name": model, "versions": [MODEL_VERSION], "platform": PLATFORM,
                "inputs": [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]}],
                "outputs": [_tensor_metadata(manifest.output)],
                "parameters": {"tensor_model": manifest.model_id,
                               "formats": "jpeg,png,webp"}}
    return {"name": manifest.model_id, "versions": [MODEL_VERSION], "platform": PLATFORM,
            "inputs": [_tensor_metadata(manifest.input)],
            "outputs": [_tensor_metadata(manifest.output)],
            "parameters": preprocessing_parameters(manifest)}


@router.get("/models/{model}/ready")
@router.get("/models/{model}/versions/{version}/ready")
async def model_ready(model: str, pipeline: PipelineDep,
                      version: str | None = None) -> JSONResponse:
    _manifest_for(pipeline, model, version)
    is_ready = pipeline.ready()
    return JSONResponse({"name": model, "ready": is_ready},
                        status_code=200 if is_ready else 503)


@router.post("/models/{model}/infer")
@router.post("/models/{model}/versions/{version}/infer")
async def infer(model: str, request: Request, pipeline: PipelineDep, settings: SettingsDep,
                version: str | None = None) -> Response:
    manifest, image = _manifest_for(pipeline, model, version)
    body = await request.body()
    body = _decompress(body, request.headers.get("content-encoding"), settings.max_body_bytes)
    header_length = _header_length(request.headers.get(HEADER_LENGTH))
    if image:
        images = await run_in_threadpool(parse_image_request, body, header_length, manifest)
        check_batch(images.images, request.app.state.limits)
        batch = await run_in_threadpool(_prepare_images, pipeline, images.images)
        parsed = InferRequest(id=images.id, batch=batch, outputs=images.outputs)
    else:
        parsed = await _maybe_in_thread(_json_bytes(body, header_length),
                                        parse_infer_request, body, header_length, manifest)
    check_batch(parsed.batch, request.app.state.limits)
    outputs = await _run_batch(pipeline, parsed.batch)
    as_json = sum(not binary for _, binary in parsed.outputs) * outputs.size * 12
    content, header_length = await _maybe_in_thread(as_json, encode_infer_response, parsed,
                                                    outputs, manifest, model)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(header_length)})


# JSON text up to this size is parsed or written on the event loop: a hop to a worker thread
# costs more than that (and, on a busy machine, waits for a core). Larger JSON goes to a thread
# so it does not hold up other requests; binary tensor data is never parsed, only viewed.
INLINE_JSON_BYTES = 64 * 1024


def _json_bytes(body: bytes, header_length: int | None) -> int:
    return len(body) if header_length is None else header_length


async def _maybe_in_thread(json_bytes: int, function: Callable[..., T], *args: Any) -> T:
    if json_bytes <= INLINE_JSON_BYTES:
        return function(*args)
    return await run_in_threadpool(function, *args)


async def _run_batch(pipeline: Pipeline, batch: np.ndarray) -> np.ndarray:
    """Run each sample of ``batch`` through the pipeline; their outputs stacked in order."""
    if len(batch) == 1:  # the common case, without a task per sample
        result = await pipeline.infer(batch)
        return np.asarray(result.output, dtype=np.float32)
    slots = asyncio.Semaphore(SAMPLES_IN_FLIGHT)

    async def one(sample: np.ndarray) -> np.ndarray:
        async with slots:
            result = await pipeline.infer(sample[None])
        return np.asarray(result.output, dtype=np.float32)

    tasks = [asyncio.ensure_future(one(sample)) for sample in batch]
    try:
        outputs = await asyncio.gather(*tasks)
    finally:  # one sample failed (or the client left): stop the rest, collect their errors
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return np.concatenate(outputs, axis=0)


# --- the wire format -------------------------------------------------------------------------


@dataclass(frozen=True)
class InferRequest:
    """A decoded ``infer`` request: the input batch and how each output is to be returned."""

    id: str | None
    batch: np.ndarray  # (N, *sample shape) float32
    outputs: tuple[tuple[str, bool], ...]  # (name, as binary data), in the order asked


@dataclass(frozen=True)
class ImageRequest:
    """A decoded ``infer`` request for the image model: encoded images, outputs as asked."""

    id: str | None
    images: tuple[bytes, ...]
    outputs: tuple[tuple[str, bool], ...]


def _prepare_images(pipeline: Pipeline, images: Sequence[bytes]) -> np.ndarray:
    """Decode and preprocess each image (``InputSpecError``, a 400, names the bad one)."""
    tensors = []
    for index, data in enumerate(images):
        try:
            tensors.append(pipeline.prepare_image(data))
        except InputSpecError as exc:
            raise InputSpecError(f"input '{IMAGE_INPUT}' element {index}: {exc}") from exc
    return np.concatenate(tensors, axis=0)


def _header_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise _bad_request(f"{HEADER_LENGTH} must be an integer, got '{value}'") from None
    if length < 0:
        raise _bad_request(f"{HEADER_LENGTH} must not be negative, got {length}")
    return length


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip | deflate`` (Triton clients can compress requests)."""
    if encoding is None or encoding.strip().lower() in ("", "identity"):
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding.strip().lower())
    if wbits is None:
        raise HTTPException(415, f"unsupported Content-Encoding '{encoding}': "
                                 "send gzip, deflate or identity")
    decompressor = zlib.decompressobj(wbits)
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _bad_request(f"request body is not valid {encoding} data ({exc})") from exc
    if len(data) > limit:
        raise HTTPException(413, f"decompressed request body is over the limit of {limit} bytes")
    if not decompressor.eof:
        raise _bad_request(f"request body is truncated {encoding} data")
    return data


def _split_body(body: bytes, header_length: int | None, model: str,
                input_name: str) -> tuple[dict[str, Any], memoryview, dict[str, Any]]:
    """The JSON header, the binary data after it, and the one input tensor's description."""
    if header_length is None:
        header_length = len(body)
    if header_length > len(body):
        raise _bad_request(f"{HEADER_LENGTH} is {header_length} but the body has only "
                           f"{len(body)} bytes")
    binary = memoryview(body)[header_length:]
    try:
        doc = json.loads(body[:header_length])
    except (UnicodeDecodeError, ValueError) as exc:
        hint = ("" if header_length < len(body)
                else f" (binary data needs the {HEADER_LENGTH} header)")
        raise _bad_request(f"the inference request is not valid JSON: {exc}{hint}") from None
    if not isinstance(doc, dict):
        raise _bad_request("the inference request must be a JSON object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad_request(f"model '{model}' takes exactly one input, '{input_name}': "
                           "send \"inputs\": [{...}]")
    return doc, binary, inputs[0]


def _check_binary_used(binary: memoryview, used: int) -> None:
    if used != len(binary):
        raise _bad_request(f"{len(binary)} bytes of binary data follow the JSON header but the "
                           f"inputs' binary_data_size add up to {used}")


def _id_and_outputs(doc: dict[str, Any],
                    info: TensorInfo) -> tuple[str | None, tuple[tuple[str, bool], ...]]:
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad_request("\"parameters\" must be a JSON object")
    request_id = doc.get("id")
    return (None if request_id is None else str(request_id),
            _requested_outputs(doc.get("outputs"), info, _flag(params, "binary_data_output")))


def parse_infer_request(body: bytes, header_length: int | None,
                        manifest: Manifest) -> InferRequest:
    """Decode an ``infer`` body (JSON, or JSON + binary tensors) for ``manifest``'s model."""
    doc, binary, tensor = _split_body(body, header_length, manifest.model_id,
                                      manifest.input.name)
    batch, used = _decode_input(tensor, manifest.input, binary)
    _check_binary_used(binary, used)
    request_id, outputs = _id_and_outputs(doc, manifest.output)
    return InferRequest(id=request_id, batch=batch, outputs=outputs)


def parse_image_request(body: bytes, header_length: int | None,
                        manifest: Manifest) -> ImageRequest:
    """Decode an ``infer`` body for the image model: one ``BYTES`` input of shape [N]."""
    doc, binary, tensor = _split_body(body, header_length,
                                      manifest.model_id + IMAGE_SUFFIX, IMAGE_INPUT)
    images, used = _decode_bytes_input(tensor, binary)
    _check_binary_used(binary, used)
    request_id, outputs = _id_and_outputs(doc, manifest.output)
    return ImageRequest(id=request_id, images=images, outputs=outputs)


def _decode_bytes_input(tensor: dict[str, Any],
                        binary: memoryview) -> tuple[tuple[bytes, ...], int]:
    """The images of a ``BYTES`` input, and how many bytes of ``binary`` they took."""
    name = tensor.get("name")
    if name != IMAGE_INPUT:
        raise _bad_request(f"unknown input {name!r}: the image model's input is "
                           f"'{IMAGE_INPUT}'")
    if tensor.get("datatype") != "BYTES":
        raise _bad_request(f"input '{IMAGE_INPUT}': datatype {tensor.get('datatype')!r} is not "
                           "supported; send the encoded images as BYTES")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
            or (len(shape) == 2 and shape[1] != 1)):
        raise _bad_request(f"input '{IMAGE_INPUT}': shape {shape!r} must be [N] (or [N, 1]), "
                           "one element per image")
    count = shape[0]
    if count > MAX_IMAGES:
        raise _bad_request(f"input '{IMAGE_INPUT}': {count} images; send at most {MAX_IMAGES} "
                           "per request")
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad_request(f"input '{IMAGE_INPUT}': \"parameters\" must be a JSON object")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
            raise _bad_request(f"input '{IMAGE_INPUT}': binary_data_size {size!r} must be a "
                               f"non-negative integer of at most the {len(binary)} bytes "
                               "after the JSON header")
        return _split_bytes_elements(binary[:size], count), size
    data = tensor.get("data")
    if not isinstance(data, list):
        raise _bad_request(f"input '{IMAGE_INPUT}' has neither \"data\" nor a "
                           "binary_data_size parameter")
    flat = [item for row in data for item in (row if isinstance(row, list) else [row])]
    if len(flat) != count or not all(isinstance(item, str) for item in flat):
        raise _bad_request(f"input '{IMAGE_INPUT}': data must hold {count} base64 strings, "
                           "one per image")
    try:
        return tuple(base64.b64decode(item, validate=True) for item in flat), 0
    except (binascii.Error, ValueError):
        raise _bad_request(f"input '{IMAGE_INPUT}': data is not base64; in JSON, send each "
                           "image base64-encoded") from None


def _split_bytes_elements(raw: memoryview, count: int) -> tuple[bytes, ...]:
    """``count`` elements of the binary BYTES format: a 4-byte little-endian length, then
    that many bytes, for each element in turn."""
    elements: list[bytes] = []
    offset = 0
    for index in range(count):
        if offset + 4 > len(raw):
            raise _bad_request(f"input '{IMAGE_INPUT}': binary data ends before element "
                               f"{index}'s length")
        length = int.from_bytes(raw[offset:offset + 4], "little")
        offset += 4
        if offset + length > len(raw):
            raise _bad_request(f"input '{IMAGE_INPUT}': element {index} says {length} bytes "
                               f"but only {len(raw) - offset} follow")
        elements.append(bytes(raw[offset:offset + length]))
        offset += length
    if offset != len(raw):
        raise _bad_request(f"input '{IMAGE_INPUT}': {len(raw) - offset} bytes are left after "
                           f"{count} elements")
    return tuple(elements)


def _flag(params: dict[str, Any], name: str, default: bool = False) -> bool:
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise _bad_request(f"parameter {name} must be true or false, got {value!r}")
    return value


def _decode_input(tensor: dict[str, Any], info: TensorInfo,
                  binary: memoryview) -> tuple[np.ndarray, int]:
    """The input as a float32 batch, and how many bytes of ``binary`` it took."""
    name = tensor.get("name")
    if name != info.name:
        raise _bad_request(f"unknown input {name!r}: the model's input is '{info.name}'")
    datatype = tensor.get("datatype")
    if datatype != "FP32":
        raise _bad_request(f"input '{info.name}': datatype {datatype!r} is not supported; "
                           "send FP32")
    shape = _check_shape(tensor.get("shape"), info)
    count = math.prod(shape)
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad_request(f"input '{info.name}': \"parameters\" must be a JSON object")
    if "shared_memory_region" in params:
        raise _bad_request("the shared memory extension is not supported: send the data "
                           "in the request")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _bad_request(f"input '{info.name}': binary_data_size must be a "
                               f"non-negative integer, got {size!r}")
        if size != count * 4:
            raise _bad_request(f"input '{info.name}': shape {shape} in FP32 is {count * 4} "
                               f"bytes, but binary_data_size is {size}")
        if size > len(binary):
            raise _bad_request(f"input '{info.name}': binary_data_size is {size} but only "
                               f"{len(binary)} bytes follow the JSON header")
        # a read-only view of the request body, no copy (on big-endian hosts, a copy)
        array = np.frombuffer(binary[:size], dtype="<f4").astype(np.float32, copy=False)
        return array.reshape(shape), size
    if "data" not in tensor:
        raise _bad_request(f"input '{info.name}' has neither \"data\" nor a "
                           "binary_data_size parameter")
    try:
        array = np.asarray(tensor["data"], dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise _bad_request(f"input '{info.name}': data is not a list of numbers ({exc})") from None
    if array.size != count:
        raise _bad_request(f"input '{info.name}': shape {shape} needs {count} values, "
                           f"data has {array.size}")
    return array.reshape(shape), 0


def _check_shape(shape: object, info: TensorInfo) -> list[int]:
    expected = [-1, *info.shape[1:]]
    if (not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise _bad_request(f"input '{info.name}': shape must be a list of integers, "
                           f"like {[1, *expected[1:]]}")
    ok = (len(shape) == len(expected) and shape[0] >= 1
          and all(want in (-1, got) and got >= 1
                  for want, got in zip(expected[1:], shape[1:], strict=True)))
    if not ok:
        raise _bad_request(f"input '{info.name}': shape {shape} does not match {expected} "
                           "(-1 is the batch size)")
    return shape


def _requested_outputs(outputs: object, info: TensorInfo,
                       binary_default: bool) -> tuple[tuple[str, bool], ...]:
    if outputs is None:
        return ((info.name, binary_default),)
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise _bad_request("\"outputs\" must be a list of objects")
    requested: list[tuple[str, bool]] = []
    for output in outputs:
        name = output.get("name")
        if name != info.name:
            raise _bad_request(f"unknown output {name!r}: the model's output is '{info.name}'")
        params = output.get("parameters") or {}
        if not isinstance(params, dict):
            raise _bad_request(f"output '{info.name}': \"parameters\" must be a JSON object")
        if "classification" in params:
            raise _bad_request("the classification extension is not supported: "
                               "use POST /v1/classify")
        requested.append((info.name, _flag(params, "binary_data", binary_default)))
    return tuple(requested)


def encode_infer_response(request: InferRequest, output: np.ndarray, manifest: Manifest,
                          model_name: str | None = None) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it."""
    raw = np.ascontiguousarray(output, dtype="<f4")
    shape = list(raw.shape)
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, as_binary in request.outputs:
        tensor: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": shape}
        if as_binary:
            blobs.append(raw.tobytes())
            tensor["parameters"] = {"binary_data_size": raw.nbytes}
        else:
            tensor["data"] = _flat(raw)
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model_name or manifest.model_id,
                                "model_version": MODEL_VERSION}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = tensors
    header = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _flat(array: np.ndarray) -> Sequence[float]:
    values: list[float] = array.reshape(-1).tolist()
    return values
