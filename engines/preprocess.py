"""Image -> input tensor, as the manifest's preprocessing says (shared by builder and source)."""

from __future__ import annotations

import io

import numpy as np

from engines.errors import InputSpecError
from engines.manifest import Preprocessing

MAX_IMAGE_PIXELS = 50_000_000


def decode_image(data: bytes) -> object:
    """Decode JPEG/PNG/WebP/... bytes to an RGB PIL image, or ``InputSpecError``."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    if not data:
        raise InputSpecError("empty image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputSpecError(f"not a readable image ({type(exc).__name__}: {exc})") from exc


def preprocess(image: object, prep: Preprocessing) -> np.ndarray:
    """Resize the short side to ``prep.resize``, centre-crop ``prep.crop``, normalise.

    Returns a float32 array of shape (1, 3, crop, crop) (NCHW)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InputSpecError(f"expected an image, got {type(image).__name__}")
    img = image.convert("RGB")
    width, height = img.size
    scale = prep.resize / min(width, height)
    img = img.resize((max(prep.crop, round(width * scale)), max(prep.crop, round(height * scale))),
                     Image.Resampling.BILINEAR)
    width, height = img.size
    left, top = (width - prep.crop) // 2, (height - prep.crop) // 2
    img = img.crop((left, top, left + prep.crop, top + prep.crop))
    arr: np.ndarray = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    arr = (arr - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    if prep.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr[None], dtype=np.float32)
