"""Reading images the same way everywhere: converters, the shard reader, the pseudo-label job and ``weaktr
predict`` all see the pixels a photo viewer shows (EXIF orientation applied, transparency over white, any
mode as RGB)."""

from __future__ import annotations

import io
import os
from typing import IO, Union

import numpy as np
from PIL import Image, ImageOps

Source = Union[str, os.PathLike, bytes, IO[bytes]]
_STORED_AS_IS = (b"\xff\xd8", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG: the formats shards keep byte for byte
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # how PIL opens 16-bit grayscale (e.g. PNG)


def load_rgb(source: Source) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file, its bytes or a binary file object, EXIF orientation applied."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return _rgb(image)


def _rgb(image: Image.Image) -> np.ndarray:
    image = ImageOps.exif_transpose(image)  # rotate/flip as the camera recorded it
    if image.mode in _SIXTEEN_BIT_GRAY:
        # 0..65535 to 0..255; convert("RGB") would clip at 255, turning nearly every pixel white.
        eight_bit = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(eight_bit, "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency over white instead of exposing whatever colour hides under alpha 0.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.array(image.convert("RGB"))  # writable: torch and pydensecrf want to own the buffer


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, bytes | None]:
    """A file's pixels (``load_rgb``; a file PIL cannot decode raises) and its bytes when a shard can keep them
    as they are: a JPEG or PNG without an EXIF rotation. Otherwise None (the converter stores the decoded pixels,
    so every later reader sees the same upright image)."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError("empty file (0 bytes)")
    with Image.open(io.BytesIO(data)) as image:
        rotated = image.getexif().get(_EXIF_ORIENTATION, 1) != 1
        pixels = _rgb(image)
    keep = data.startswith(_STORED_AS_IS) and not rotated
    return pixels, data if keep else None
