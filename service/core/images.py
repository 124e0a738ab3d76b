"""PNG and JPEG files: which names are images, and their pixels decoded with Pillow (no torch)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA")     # Pillow's modes of images without colour


class ImageError(ValueError):
    """An image cannot be decoded; the message names it and says why, in one line."""


def has_image_suffix(path: str | Path) -> bool:
    """Whether the file name ends in one of IMAGE_SUFFIXES, in any case."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_pixels(source: bytes | str | Path, name: str, mode: str | None = None) -> np.ndarray:
    """The uint8 pixels of a PNG/JPEG given as bytes or a path: (H, W) grey or (H, W, 3) RGB.

    ``mode`` "L" or "RGB" converts to that; None keeps a grey image (GREY_MODES) grey and makes
    any other RGB. Raises ImageError, naming the image as ``name``, when Pillow cannot read it
    or refuses it as a decompression bomb.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            target = mode or ("L" if image.mode in GREY_MODES else "RGB")
            return np.asarray(image.convert(target), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: not a readable PNG or JPEG image ({exc})") from None
