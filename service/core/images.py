"""PNG and JPEG files: which names are images, their headers checked, their pixels decoded (Pillow).

One rule for every place that decodes images (the API's certify uploads, the CLI's local inputs,
the training image folders):

- **Header first.** The format, size, frame count and mode are read from the file's header
  (:func:`read_header`) and checked (:meth:`ImageHeader.check`) before any pixel is decoded: the
  size against the size the model takes, when the caller knows it, and always against
  :data:`MAX_IMAGE_PIXELS` (4096 x 4096), so a small file that claims huge dimensions costs its
  header, never its pixels.
- **Formats**: PNG and JPEG, recognised by their content, not their name; a GIF, TIFF, WebP or
  BMP file is refused under any name.
- **One frame**: animated PNGs (APNG) and JPEGs holding several pictures (MPO) are refused;
  nothing picks a frame for you.
- **Modes** (Pillow's names): grey ``1`` (bilevel: 0 or 1), ``L`` (8-bit, also 1-, 2- and 4-bit PNGs)
  and ``I;16`` (16-bit grey PNG, scaled by 1/65535, not clipped to 8 bits); colour ``RGB`` and
  ``P`` (palette PNG, looked up to RGB). Refused: ``CMYK`` JPEGs (converting them without their
  colour profile would change their colours: convert them to RGB yourself), 16-bit colour and
  16-bit grey-and-alpha PNGs (Pillow decodes only the high byte of each channel: save them as
  8-bit) and any other mode.
- **Transparency** (``LA``, ``RGBA``, or a PNG's transparent colour or palette entries): the image
  is accepted only when every pixel is fully opaque, and its alpha is then dropped; one pixel
  that is not fully opaque refuses it, since nothing here picks a background to blend onto.
- **Channels**: a grey image given to a colour model repeats its grey in R, G and B; a colour
  image given to a grey model becomes Pillow's luma L = 0.299 R + 0.587 G + 0.114 B.

Pixels come back as integers whose dtype is their depth (uint8, or uint16 for 16-bit grey);
:func:`to_unit` scales them to [0, 1] by that depth's largest value.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I;16")  # Pillow's modes of images without colour
COLOUR_MODES = ("RGB", "RGBA", "P")
FORMATS = ("PNG", "JPEG")  # Pillow's JPEG reader also opens MPO, a JPEG with several pictures
MAX_IMAGE_PIXELS = 4096 * 4096
ACCEPTED = (
    "accepted: PNG or JPEG, one frame, grey (1, L, 16-bit grey PNG), RGB or palette colour; "
    "alpha only when fully opaque"
)
# The first bytes of formats Pillow could read but that are not accepted, to name them in the refusal.
_OTHER_FORMATS = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)
Source = bytes | str | Path


class ImageError(ValueError):
    """An image cannot be used; the message names it and says why (and what is accepted), in one line."""


@dataclass(frozen=True)
class ImageHeader:
    """What a PNG/JPEG's header says, read without decoding a pixel."""

    name: str
    format: str  # PNG, JPEG or MPO
    mode: str  # Pillow's mode, e.g. L, I;16, RGB, RGBA, P, CMYK
    width: int
    height: int
    frames: int
    bits: int  # bits per channel as decoded: 8, or 16
    transparency: bool  # an alpha channel, or transparent colours or palette entries

    @property
    def grey(self) -> bool:
        return self.mode in GREY_MODES

    def check(
        self, size: tuple[int, int] | None = None, max_pixels: int = MAX_IMAGE_PIXELS
    ) -> None:
        """ImageError unless this image is accepted (module docstring) and, when ``size`` (height,
        width: the model's) is given, exactly that size; nothing is resized."""
        what = f"{self.name}: {self.width}x{self.height} pixels (width x height)"
        if self.frames != 1:
            raise ImageError(
                f"{self.name}: {self.frames} frames (an animated or multi-picture {self.format}); "
                f"only single-frame images are accepted ({ACCEPTED})"
            )
        if size is not None and (self.height, self.width) != tuple(size):
            raise ImageError(
                f"{what}, the model takes {size[1]}x{size[0]}; resize it first (nothing is "
                "resized here)"
            )
        if self.width * self.height > max_pixels:
            raise ImageError(f"{what} is over the cap of {max_pixels:,} pixels per image")
        if self.mode == "CMYK":
            raise ImageError(
                f"{self.name}: a CMYK {self.format}; convert it to RGB with its colour profile first "
                f"({ACCEPTED})"
            )
        if self.bits != 8 and self.mode != "I;16":
            raise ImageError(
                f"{self.name}: a {self.bits}-bit colour or grey-and-alpha {self.format}, which would "
                f"be decoded to 8 bits; save it as 8-bit ({ACCEPTED})"
            )
        if self.mode not in GREY_MODES + COLOUR_MODES:
            raise ImageError(
                f"{self.name}: {self.format} mode {self.mode} is not accepted ({ACCEPTED})"
            )


def has_image_suffix(path: str | Path) -> bool:
    """Whether the file name ends in one of IMAGE_SUFFIXES, in any case."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


@contextmanager
def _opened(source: Source, name: str) -> Iterator[tuple[ImageFile.ImageFile, ImageHeader]]:
    """The image opened lazily (Pillow reads the header only) with its header; ImageError when
    it is not a PNG or JPEG, and for any error while the caller decodes it."""
    try:
        with Image.open(
            io.BytesIO(source) if isinstance(source, bytes) else source, formats=FORMATS
        ) as image:
            yield image, _header(image, name)
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{name}: over the cap of {MAX_IMAGE_PIXELS:,} pixels per image ({exc})"
        ) from None
    except UnidentifiedImageError as exc:
        other = _other_format(source)
        if other:
            raise ImageError(f"{name}: a {other} image; only PNG and JPEG are accepted") from None
        raise ImageError(f"{name}: not a readable PNG or JPEG image ({exc})") from None
    except OSError as exc:  # truncated or corrupt data, found while decoding
        raise ImageError(f"{name}: not a readable PNG or JPEG image ({exc})") from None


def _header(image: ImageFile.ImageFile, name: str) -> ImageHeader:
    args = image.tile[0].args if image.tile else None
    rawmode = (
        args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else "")
    )
    bits = 16 if ";16" in str(rawmode) else 8
    return ImageHeader(
        name=name,
        format=str(image.format),
        mode=image.mode,
        width=image.width,
        height=image.height,
        frames=int(getattr(image, "n_frames", 1)),
        bits=bits,
        transparency=image.has_transparency_data,
    )


def _other_format(source: Source) -> str | None:
    try:
        if isinstance(source, bytes):
            head = source[:16]
        else:
            with open(source, "rb") as file:
                head = file.read(16)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for magic, fmt in _OTHER_FORMATS if head.startswith(magic)), None)


def read_header(source: Source, name: str) -> ImageHeader:
    """The header of a PNG/JPEG given as bytes or a path, no pixel decoded; ImageError when it is
    not a PNG or JPEG at all (:meth:`ImageHeader.check` judges the rest)."""
    with _opened(source, name) as (_, header):
        return header


def read_pixels(
    source: Source,
    name: str,
    mode: str | None = None,
    size: tuple[int, int] | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """The pixels of a PNG/JPEG given as bytes or a path: (H, W) grey or (H, W, 3) RGB, uint8, or
    uint16 for a 16-bit grey PNG.

    ``mode`` "L" or "RGB" converts to that; None keeps a grey image grey and makes any other RGB.
    The header is checked first (:meth:`ImageHeader.check`, with ``size`` and ``max_pixels``);
    then a transparent pixel refuses the image. Raises ImageError, naming the image as ``name``.
    """
    with _opened(source, name) as (image, header):
        header.check(size, max_pixels)
        target = mode or ("L" if header.grey else "RGB")
        if header.mode == "I;16":
            grey = np.asarray(image, dtype=np.uint16)
            if header.transparency and np.any(grey == image.info.get("transparency")):
                _refuse_transparent(
                    header, int(np.count_nonzero(grey == image.info["transparency"]))
                )
            return grey if target == "L" else np.repeat(grey[..., None], 3, axis=2)
        if header.transparency:
            alpha = np.asarray(image.convert("RGBA").getchannel("A"))
            if alpha.min() < 255:
                _refuse_transparent(header, int(np.count_nonzero(alpha < 255)))
        return np.asarray(image.convert(target), dtype=np.uint8)


def _refuse_transparent(header: ImageHeader, count: int) -> None:
    raise ImageError(
        f"{header.name}: {count} of {header.width * header.height} pixels are not fully opaque; "
        "images with transparency are accepted only when fully opaque (flatten it onto a "
        "background first)"
    )


def to_unit(pixels: np.ndarray) -> np.ndarray:
    """Integer pixels as float32 in [0, 1], divided by their dtype's largest value (255, 65535):
    one new array, divided in place. The API's 8-bit inputs are stored as they came and scaled
    by the worker with this very function, so they are certified exactly as scaled here."""
    unit = pixels.astype(np.float32)
    unit /= np.float32(np.iinfo(pixels.dtype).max)
    return unit
