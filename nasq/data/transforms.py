"""The seed's preprocessing: resize the shorter side to 378 (bilinear, antialiased), center
crop 331, [0, 1], normalize with mean = std = 0.5 (Cadene's ``TransformImage``)."""
from __future__ import annotations

import os

import numpy as np

from ..model.spec import PREPROCESS, PreprocessSpec


class ImageError(Exception):
    """An image that cannot be used; the message is the reason recorded in the report."""


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(size)``: shorter side to ``size``.

    The longer side is truncated, not rounded, exactly as torchvision computes it.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def preprocess_u8(src, spec: PreprocessSpec = PREPROCESS, *, name: str | None = None) -> np.ndarray:
    """Decode one image and return the seed's crop as uint8 HWC (331x331x3, RGB).

    Same operations as Cadene's ``TransformImage`` up to ``ToTensor``: RGB conversion,
    PIL bilinear resize (antialiased) of the shorter side to 378, center crop 331. ``src`` is a
    path, a file object, or the file's bytes (``name``: the file they were read from).

    Raises:
        ImageError: unreadable, truncated or non-image input, or one too large to decode
            (Pillow's decompression bomb limit).
    """
    import io

    from PIL import Image

    if isinstance(src, (bytes, bytearray, memoryview)):
        if not len(src):
            raise ImageError("empty file")
        src = io.BytesIO(src)
    try:
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            nw, nh = resized_size(w, h, spec.resize)
            im = im.resize((nw, nh), Image.BILINEAR)
            left = int(round((nw - spec.crop) / 2.0))
            top = int(round((nh - spec.crop) / 2.0))
            im = im.crop((left, top, left + spec.crop, top + spec.crop))
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - whatever Pillow raises on a file is that image's reason
        reason = str(e) or type(e).__name__
        if not isinstance(e, (OSError, ValueError, SyntaxError, Image.DecompressionBombError)):
            reason = f"{type(e).__name__}: {reason}"
        if isinstance(src, (str, os.PathLike)) and os.path.isfile(src) and os.path.getsize(src) == 0:
            reason = "empty file"
        elif isinstance(src, io.BytesIO):  # Pillow names the buffer, not the file
            reason = reason.replace(repr(src), repr(name) if name else "image")
        raise ImageError(reason) from None


def normalize_u8(batch: np.ndarray, spec: PreprocessSpec = PREPROCESS) -> np.ndarray:
    """uint8 NHWC crops -> normalized float32 NCHW, as ToTensor + Normalize compute it."""
    x = batch.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def preprocess_float(src, spec: PreprocessSpec = PREPROCESS) -> np.ndarray:
    """One image as the seed's float32 CHW input (what a ``.bin`` file holds)."""
    return normalize_u8(preprocess_u8(src, spec)[None], spec)[0]


