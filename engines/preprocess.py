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


def pixels(image: object, prep: Preprocessing) -> np.ndarray:
    """Resize the short side to ``prep.resize`` (more if the crop needs it) and centre-crop
    ``prep.crop`` x ``prep.crop_width``: the uint8 pixels, shape (1, 3, crop, crop_width)
    for NCHW (NHWC otherwise), not yet normalised.

    This is what the source ships for an image request (a quarter of float32's bytes); the
    node that runs block 0 normalises it (``Normaliser``)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InputSpecError(f"expected an image, got {type(image).__name__}")
    img = image.convert("RGB")
    crop_h, crop_w = prep.crop, prep.crop_width or prep.crop
    width, height = img.size
    scale = max(prep.resize / min(width, height), crop_w / width, crop_h / height)
    img = img.resize((max(crop_w, round(width * scale)), max(crop_h, round(height * scale))),
                     Image.Resampling.BILINEAR)
    width, height = img.size
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    arr = np.asarray(img.crop((left, top, left + crop_w, top + crop_h)), dtype=np.uint8)
    if prep.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr[None])


class Normaliser:
    """uint8 pixels -> the float32 model input: ``(x / 255 - mean) / std`` per channel, as
    one multiply-add (``x * scale + offset``) into a fresh array."""

    def __init__(self, prep: Preprocessing) -> None:
        std = np.asarray(prep.std, np.float64)
        mean = np.asarray(prep.mean, np.float64)
        shape = (1, 3, 1, 1) if prep.layout == "NCHW" else (1, 1, 1, 3)
        self.scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(shape)
        self.offset = (-mean / std).astype(np.float32).reshape(shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.dtype != np.uint8:
            raise InputSpecError(f"expected uint8 pixels, got {x.dtype}")
        out: np.ndarray = np.multiply(x, self.scale, dtype=np.float32)
        out += self.offset
        return out


def preprocess(image: object, prep: Preprocessing) -> np.ndarray:
    """Resize the short side to ``prep.resize``, centre-crop ``prep.crop``, normalise.

    Returns a float32 array of shape (1, 3, crop, crop) (NCHW)."""
    return Normaliser(prep)(pixels(image, prep))
