"""Image files made in the tests with Pillow: the kinds an upload may be (valid and hostile).

Each helper returns the file's bytes. Pillow writes every kind but two, which are written here
chunk by chunk: a 16-bit colour PNG (Pillow cannot save one) and a PNG whose header claims a
size its (absent) pixel data never backs, to show that a refusal comes from the header alone.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def save(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def grey8(array: np.ndarray) -> bytes:
    """(H, W) in [0, 1] as an 8-bit grey PNG."""
    return save(Image.fromarray((np.asarray(array) * 255).round().astype(np.uint8), mode="L"))


def grey16(array: np.ndarray) -> bytes:
    """(H, W) in [0, 1] as a 16-bit grey PNG (Pillow's mode I;16)."""
    return save(Image.fromarray((np.asarray(array) * 65535).round().astype(np.uint16)))


def frames(fmt: str, count: int = 3, size=(8, 8)) -> bytes:
    """An animated PNG (fmt "PNG"), animated GIF, multi-page TIFF or multi-picture JPEG ("MPO")."""
    images = [Image.new("L", size, 40 * i) for i in range(count)]
    return save(images[0], fmt, save_all=True, append_images=images[1:])


def huge_bilevel(width: int = 13000, height: int = 13000) -> bytes:
    """A real, complete 1-bit PNG of ``width`` x ``height`` black pixels: ~20 KB on the wire for
    13000 x 13000, 169 MB once Pillow holds its pixels."""
    return save(Image.new("1", (width, height)), optimize=True)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, depth: int, colour_type: int, rows: bytes | None) -> bytes:
    """A PNG written by hand: IHDR with these fields, then IDAT holding ``rows`` (each a filter
    byte and the row's samples) compressed, or no IDAT at all when ``rows`` is None."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0))
    data = b"" if rows is None else _chunk(b"IDAT", zlib.compress(rows))
    return b"\x89PNG\r\n\x1a\n" + header + data + _chunk(b"IEND", b"")


def rgb16(width: int = 8, height: int = 8) -> bytes:
    """A 16-bit RGB PNG (colour type 2, depth 16) of one colour."""
    row = b"\x00" + b"\xff\xff\x80\x00\x12\x34" * width
    return raw_png(width, height, 16, 2, row * height)
