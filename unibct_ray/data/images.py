"""Image decoding and normalisation shared by training and feature extraction.

Pixels are mapped with ``(x - 127.5) / 127.5`` in training *and* evaluation (the insightface
evaluation divides by 128 instead; one convention everywhere keeps old/new features
comparable with the statistics the model was trained on).
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from unibct_ray.errors import DataFormatError

__all__ = ["PIXEL_MEAN", "PIXEL_STD", "decode_images", "decode_uint8", "to_tensor_layout"]

PIXEL_MEAN = 127.5
PIXEL_STD = 127.5


def to_tensor_layout(images: np.ndarray) -> np.ndarray:
    """uint8 [b, H, W, 3] -> normalised float32 [b, 3, H, W]."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2)
    return (x - PIXEL_MEAN) / PIXEL_STD


def decode_images(data: Sequence[bytes], size: int, flip: np.ndarray | None = None,
                  keys: Sequence[int] | None = None, source: str = "shard") -> np.ndarray:
    """Decode encoded images to normalised float32 [b, 3, size, size].

    Images of another size are resized (bilinear); ``flip`` (bool [b]) mirrors rows
    horizontally. An undecodable image raises ``DataFormatError`` naming its record key.
    """
    out = _decode_hwc(data, size, keys, source)
    if flip is not None and flip.any():
        out[flip] = out[flip, :, ::-1]
    return to_tensor_layout(out)


def decode_uint8(data: Sequence[bytes], size: int, keys: Sequence[int] | None = None,
                 source: str = "shard") -> np.ndarray:
    """Decode encoded images to uint8 [b, 3, size, size] (channels first, not normalised, not
    flipped): a quarter of the float32 bytes; the training loop normalises on its device."""
    return np.ascontiguousarray(_decode_hwc(data, size, keys, source).transpose(0, 3, 1, 2))


def _decode_hwc(data: Sequence[bytes], size: int, keys: Sequence[int] | None, source: str) -> np.ndarray:
    out = np.empty((len(data), size, size, 3), np.uint8)
    for i, buf in enumerate(data):
        try:
            with Image.open(io.BytesIO(buf)) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(im)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            key = keys[i] if keys is not None else i
            raise DataFormatError(f"{source}: image with index {key} does not decode ({e})") from None
    return out
