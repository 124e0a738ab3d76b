"""Reading the images to certify and their labels from files: .npy arrays, PNG/JPEG images.

numpy and Pillow only (no torch), so the API can use it too. Never unpickles: ``.npy`` files are
read with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from smoothcert.service.core.images import (
    ImageError,
    has_image_suffix,
    read_header,
    read_pixels,
    to_unit,
)


class InputFileError(ValueError):
    """An input or label file cannot be read; the message says which and why, in one line."""


def load_npy(data: bytes | str | Path, what: str = "inputs") -> np.ndarray:
    """An array from .npy bytes or a path; object arrays (pickles) are refused."""
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        return np.load(source, allow_pickle=False)
    except FileNotFoundError:
        raise InputFileError(f"no such file: {data!s}") from None
    except ValueError as exc:
        raise InputFileError(f"{what}: not a plain .npy array ({exc})") from None
    except (OSError, EOFError) as exc:
        raise InputFileError(f"{what}: cannot read .npy data ({exc})") from None


def decode_images(
    images: Sequence[tuple[str, bytes | Path]], input_shape: Sequence[int]
) -> np.ndarray:
    """PNG/JPEG images, each (name, bytes or path), as float32 (N, C, H, W) in [0, 1] for a model
    taking ``input_shape`` (C, H, W): 1 channel (grey) or 3 (RGB).

    Every image's header is checked (its size against H x W and the pixel cap, its frames and
    mode: :mod:`smoothcert.service.core.images`) before any image is decoded, so a refusal costs
    headers only. InputFileError, naming the image, when one is refused.
    """
    channels, height, width = (int(d) for d in input_shape)
    if channels not in (1, 3):
        raise InputFileError(f"images can feed 1- or 3-channel models, this one takes {channels}")
    size, mode = (height, width), "L" if channels == 1 else "RGB"
    try:
        for name, source in images:
            read_header(source, name).check(size)
        pixels = np.stack(
            [to_unit(read_pixels(source, name, mode, size)) for name, source in images]
        )
    except ImageError as exc:
        raise InputFileError(str(exc)) from None
    return pixels[:, None] if channels == 1 else pixels.transpose(0, 3, 1, 2)


def load_inputs(paths: Sequence[str | Path], input_shape: Sequence[int]) -> np.ndarray:
    """Inputs from one .npy file, or from image files and folders of images (sorted by name).

    A .npy array is returned as stored ((C, H, W) or (N, C, H, W)); the engine checks its shape
    and range. Images are decoded for a model taking ``input_shape`` (:func:`decode_images`).
    """
    given = [Path(p) for p in paths]
    if len(given) == 1 and given[0].suffix == ".npy":
        return load_npy(given[0])
    return decode_images([(str(f), f) for f in image_files(given)], input_shape)


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The PNG/JPEG files among ``paths`` and inside its folders (sorted by name), in order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if has_image_suffix(p))
        elif has_image_suffix(path):
            if not path.is_file():
                raise InputFileError(f"no such file: {path}")
            files.append(path)
        else:
            raise InputFileError(
                f"{path}: give one .npy file, or PNG/JPEG files or folders of them"
            )
    if not files:
        raise InputFileError("no PNG or JPEG images found in " + ", ".join(map(str, paths)))
    return files


def load_labels(path: str | Path, count: int) -> np.ndarray:
    """Integer labels, one per input, from a .npy array or a text file with one label per line."""
    path = Path(path)
    if path.suffix == ".npy":
        labels = load_npy(path, "labels")
    else:
        try:
            labels = np.loadtxt(path, dtype=np.int64, ndmin=1)
        except (OSError, ValueError) as exc:
            raise InputFileError(f"labels: cannot read {path} ({exc})") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputFileError(
            f"labels must be a 1-d integer array, got {labels.dtype} of shape {labels.shape}"
        )
    if len(labels) != count:
        raise InputFileError(f"{len(labels)} labels for {count} inputs")
    return labels.astype(np.int64)
