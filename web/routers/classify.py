"""``POST /v1/classify``: an uploaded image in, the top-k labels and the path it took out.

Pipeline errors are mapped to HTTP statuses by ``web.app``; this module only checks the upload.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, HTTPException, Query, UploadFile

from web.routers import PipelineDep, SettingsDep

router = APIRouter(tags=["classify"])

MAX_TOP_K = 20


def sniff_image_type(data: bytes) -> str | None:
    """``"jpeg"``, ``"png"`` or ``"webp"`` from the file's magic bytes, else ``None``."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


@router.post("/v1/classify")
async def classify(
    pipeline: PipelineDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="A JPEG, PNG or WebP image.")],
    top_k: Annotated[int, Query(ge=1, le=MAX_TOP_K, description="How many labels.")] = 5,
) -> dict[str, Any]:
    """Classify one image: top-k labels with scores, latency, and the nodes it went through."""
    limit = settings.max_image_bytes
    if file.size is not None and file.size > limit:
        raise HTTPException(413, f"image is {file.size} bytes; the limit is {limit} bytes")
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"image is over the limit of {limit} bytes")
    if not data:
        raise HTTPException(400, "empty upload: send an image file")
    if sniff_image_type(data) is None:
        raise HTTPException(415,
                            f"{file.filename or 'upload'} is not a JPEG, PNG or WebP image")
    result = await pipeline.classify(data, top_k=top_k)
    return result.to_dict()
