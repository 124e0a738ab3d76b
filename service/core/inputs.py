"""Reading the images to certify and their labels from files: .npy arrays, PNG/JPEG images.

numpy and Pillow only (no torch), so the API can use it too. Never unpickles: ``.npy`` files are
read with ``allow_pickle=False``.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from smoothcert.service.core.images import ImageError, has_image_suffix, read_pixels


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


def decode_image(data: bytes, channels: int, name: str = "image") -> np.ndarray:
    """A PNG/JPEG as float32 (C, H, W) in [0, 1], converted to 1 (grey) or 3 (RGB) channels."""
    if channels not in (1, 3):
        raise InputFileError(f"{name}: images can feed 1- or 3-channel models, this one takes {channels}")
    try:
        pixels = read_pixels(data, name, "L" if channels == 1 else "RGB").astype(np.float32) / 255.0
    except ImageError as exc:
        raise InputFileError(str(exc)) from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def load_inputs(paths: Sequence[str | Path], channels: int) -> np.ndarray:
    """Inputs from one .npy file, or from image files and folders of images (sorted by name).

    Returns (C, H, W) or (N, C, H, W) as stored; the engine checks shape and range.
    """
    given = [Path(p) for p in paths]
    if len(given) == 1 and given[0].suffix == ".npy":
        return load_npy(given[0])
    files = image_files(given)
    images = [decode_image(f.read_bytes(), channels, str(f)) for f in files]
    if len({im.shape for im in images}) > 1:
        raise InputFileError(f"images differ in size: {sorted({im.shape for im in images})}")
    return np.stack(images)


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
            raise InputFileError(f"{path}: give one .npy file, or PNG/JPEG files or folders of them")
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
        raise InputFileError(f"labels must be a 1-d integer array, got {labels.dtype} of shape {labels.shape}")
    if len(labels) != count:
        raise InputFileError(f"{len(labels)} labels for {count} inputs")
    return labels.astype(np.int64)
