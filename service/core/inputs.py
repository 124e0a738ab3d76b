"""Reading the images to certify and their labels from files: .npy arrays, PNG/JPEG images.

numpy and Pillow only (no torch), so the API can use it too. Never unpickles: ``.npy`` files are
read with ``allow_pickle=False``, and ``.npy`` bytes sent to the API are judged by their header
alone (:func:`read_npy`: its dtype, by the one rule of :func:`check_number_dtype`, and its size
against the bytes that follow) before their data is looked at.

A request's inputs have a byte budget once decoded (:func:`check_decoded_size`), counted from the
images' or the array's header before anything is decoded; images are decoded into one buffer
(:func:`decode_pixels`), uint8 when every image is 8-bit.
"""

from __future__ import annotations

import io
import math
import re
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

STORED_FLOAT = np.dtype(np.float32)
"""How inputs that are not all 8-bit images are stored and certified: float32 in [0, 1]."""
_KINDS = {
    "b": "booleans",
    "c": "complex numbers",
    "M": "dates",
    "m": "time spans",
    "S": "byte strings",
    "U": "strings",
    "V": "raw bytes",
}


class InputFileError(ValueError):
    """An input or label file cannot be read; the message says which and why, in one line."""


class InputsTooLarge(InputFileError):
    """Inputs that would take more bytes once decoded than the budget they were read with; known
    from their headers, before anything is decoded."""


def check_decoded_size(elements: int, dtype: np.dtype, max_bytes: int | None, what: str) -> None:
    """InputsTooLarge when ``elements`` values of ``dtype`` (what the inputs are stored as) take
    more than ``max_bytes`` (None: no budget); ``what`` describes them in the message."""
    size = elements * dtype.itemsize
    if max_bytes is not None and size > max_bytes:
        raise InputsTooLarge(
            f"{what} would take {size:,} bytes once decoded, over the budget of "
            f"{max_bytes:,} bytes of decoded inputs per request"
        )


def check_number_dtype(dtype: np.dtype, what: str = "inputs") -> None:
    """The one rule for the dtype of an inputs array, wherever it comes from (a .npy file or
    base64 .npy in a request): plain integers or floats. InputFileError, in one line, for
    objects (pickles), structured records, booleans, complex numbers, dates, strings, bytes."""
    if dtype.hasobject:
        reason = "pickled Python objects, which smoothcert never unpickles"
    elif dtype.fields is not None or dtype.subdtype is not None:
        reason = "a structured dtype"
    elif dtype.kind not in "iuf":
        reason = _KINDS.get(dtype.kind, "not numbers")
    else:
        return
    shown = str(dtype) if len(str(dtype)) <= 60 else str(dtype)[:60] + "..."
    raise InputFileError(
        f"{what} .npy must hold numbers (floats in [0, 1]), not dtype {shown} ({reason})"
    )


def read_npy(data: bytes, what: str = "inputs", max_bytes: int | None = None) -> np.ndarray:
    """The array of .npy bytes, read without a copy (a read-only view of ``data``), its header
    judged first: InputFileError, in one line, for anything that is not one plain .npy array (a
    .npz archive, a pickle, another format version, a header that does not parse or whose shape
    and dtype do not match the bytes that follow) or whose dtype :func:`check_number_dtype`
    refuses; InputsTooLarge when its values, stored as float32, would take more than
    ``max_bytes``."""
    if data[:4] == b"PK\x03\x04":
        raise InputFileError(
            f"{what}: a .npz archive, not a .npy array; send one array saved with numpy.save"
        )
    shape, fortran, dtype, offset = _npy_header(data, what)
    check_number_dtype(dtype, what)
    if any(d < 0 for d in shape):
        raise InputFileError(f"{what}: the .npy header declares shape {list(shape)}")
    count = math.prod(shape)
    declared, held = count * dtype.itemsize, len(data) - offset
    if declared != held:
        raise InputFileError(
            f"{what}: the .npy header declares shape {list(shape)} of {dtype} ({declared:,} "
            f"bytes of data) but the file holds {held:,}"
        )
    check_decoded_size(
        count, STORED_FLOAT, max_bytes, f"an array of shape {list(shape)} as {STORED_FLOAT}"
    )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


def _npy_header(data: bytes, what: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """The shape, Fortran order, dtype and data offset that a .npy file's header declares."""
    fmt, source = np.lib.format, io.BytesIO(data)
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    try:
        version = fmt.read_magic(source)
        if version in readers:
            shape, fortran, dtype = readers[version](source)
            return tuple(shape), bool(fortran), dtype, source.tell()
    except (ValueError, EOFError) as exc:
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 120 else reason[:120] + "..."
        raise InputFileError(f"{what}: not a .npy array ({reason})") from None
    raise InputFileError(
        f"{what}: .npy format version {version[0]}.{version[1]} is not read here; save plain "
        "numbers with numpy.save"
    )


def load_npy(data: bytes | str | Path, what: str = "inputs") -> np.ndarray:
    """An array from .npy bytes or a path; object arrays (pickles) and .npz archives are refused."""
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        array = np.load(source, allow_pickle=False)
    except FileNotFoundError:
        raise InputFileError(f"no such file: {data!s}") from None
    except ValueError as exc:
        raise InputFileError(f"{what}: not a plain .npy array ({exc})") from None
    except (OSError, EOFError) as exc:
        raise InputFileError(f"{what}: cannot read .npy data ({exc})") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise InputFileError(f"{what}: a .npz archive, not a .npy array")
    return array


def decode_pixels(
    images: Sequence[tuple[str, bytes | Path]],
    input_shape: Sequence[int],
    max_bytes: int | None = None,
) -> np.ndarray:
    """PNG/JPEG images, each (name, bytes or path), decoded into one (N, C, H, W) buffer for a
    model taking ``input_shape`` (C, H, W): 1 channel (grey) or 3 (RGB). The buffer is uint8
    (0..255) when every image is 8-bit; with a 16-bit grey PNG among them it is float32 in
    [0, 1], each image scaled by its own depth (:func:`~smoothcert.service.core.images.to_unit`).

    Every image's header is checked (its size against H x W and the pixel cap, its frames and
    mode: :mod:`smoothcert.service.core.images`), and the buffer's size against ``max_bytes``
    (InputsTooLarge; None: no budget), before any image is decoded, so a refusal costs headers
    only. Each image is then decoded straight into its place. InputFileError, naming the image,
    when one is refused.
    """
    channels, height, width = (int(d) for d in input_shape)
    if channels not in (1, 3):
        raise InputFileError(f"images can feed 1- or 3-channel models, this one takes {channels}")
    size, mode = (height, width), "L" if channels == 1 else "RGB"
    count, shape = len(images), f"{channels}x{height}x{width}"
    elements = count * channels * height * width
    uint8 = np.dtype(np.uint8)
    check_decoded_size(elements, uint8, max_bytes, f"{count} images of {shape} as uint8")
    try:
        deep = False
        for name, source in images:
            header = read_header(source, name)
            header.check(size)
            deep = deep or header.mode == "I;16"
        dtype = STORED_FLOAT if deep else uint8
        check_decoded_size(elements, dtype, max_bytes, f"{count} images of {shape} as {dtype}")
        out = np.empty((count, channels, height, width), dtype)
        for i, (name, source) in enumerate(images):
            pixels = read_pixels(source, name, mode, size)
            if deep:
                pixels = to_unit(pixels)
            elif pixels.dtype != uint8:
                raise ImageError(
                    f"{name}: decoded as {pixels.dtype}, not the 8 bits its header says"
                )
            out[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    except ImageError as exc:
        raise InputFileError(str(exc)) from None
    return out


def decode_images(
    images: Sequence[tuple[str, bytes | Path]], input_shape: Sequence[int]
) -> np.ndarray:
    """PNG/JPEG images, each (name, bytes or path), as float32 (N, C, H, W) in [0, 1] for a model
    taking ``input_shape``: :func:`decode_pixels`, with 8-bit pixels scaled by 1/255."""
    pixels = decode_pixels(images, input_shape)
    return to_unit(pixels) if pixels.dtype == np.uint8 else pixels


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


_LABEL_LIST = re.compile(r"^\s*\d+\s*(?:,\s*\d+\s*)*$")


def parse_label_list(text: str) -> np.ndarray | None:
    """The labels of a comma list such as ``"0,1,2"`` or ``"0, 1, 2"`` (integers >= 0, spaces
    allowed around them), or None when ``text`` is not one."""
    if not _LABEL_LIST.match(text):
        return None
    return np.array([int(item) for item in text.split(",")], dtype=np.int64)


def load_labels(source: str | Path, count: int) -> np.ndarray:
    """Integer labels, one per input: from a file (a .npy array, or text with one label per line)
    or, when ``source`` names no file, from a comma list such as ``"0, 1, 2"``.

    InputFileError when ``source`` is neither an existing file nor such a list, when the file
    cannot be read or holds no 1-d integer array, or when there are not ``count`` labels.
    """
    path = Path(source)
    if not path.is_file():
        listed = parse_label_list(str(source))
        if listed is None:
            raise InputFileError(
                f"labels: {str(source)!r} is neither a file (.npy, or text with one label per "
                "line) nor a comma list of integers such as 0,1,2"
            )
        labels = listed
    elif path.suffix == ".npy":
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
