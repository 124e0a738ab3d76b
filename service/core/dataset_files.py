"""Reading an uploaded dataset: an ``.npz`` (numpy.savez) holding ``x`` and ``y``, never unpickled.

``x`` is (N, C, H, W), floats in [0, 1] or uint8 (scaled by 1/255); ``y`` holds N integer labels
≥ 0. An ``.npz`` is a zip of ``.npy`` members, so an upload could be a zip bomb or carry a
pickle. Defences, in order: the zip's central directory (which zipfile parses whole when it
opens the file) must be small, so a file of millions of empty entries costs nothing; the members
must be few and plain ``<key>.npy`` names, as numpy.savez writes them (no ``../x``, no folders);
the members' declared uncompressed sizes are checked against a cap before anything is unzipped;
each member's ``.npy`` header is read on its own and must declare a plain numeric dtype (object
arrays are pickles) whose data size matches the member's size; only then is the data read, and
zipfile stops at the declared size and checks the CRC. Nothing is ever extracted to disk. numpy only.
"""
from __future__ import annotations

import math
import re
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from smoothcert.models.pixels import PixelError, check_pixel_values

REQUIRED = ("x", "y")
MAX_MEMBERS = 64                    # numpy.savez writes one member per array; a dataset needs two
MAX_DIRECTORY_BYTES = 64 << 10      # ample for MAX_MEMBERS entries with long names
_MEMBER_NAME = re.compile(r"[^/\\\x00]+\.npy")
_HINT = "save it with numpy.savez(path, x=images, y=labels)"


class DatasetFileError(ValueError):
    """The upload is not a usable dataset; the message says why, in one line."""


class DatasetTooLarge(DatasetFileError):
    """The upload, or what it unzips to, exceeds a size cap."""


class DatasetArrays(NamedTuple):
    x: np.ndarray          # float32 (N, C, H, W) in [0, 1]
    y: np.ndarray          # int64 (N,), ≥ 0
    source_dtype: str      # x's dtype as uploaded


def read_dataset_npz(path: str | Path, max_unpacked_bytes: int) -> DatasetArrays:
    """The checked arrays of the ``.npz`` at ``path``.

    Raises DatasetTooLarge when ``x`` and ``y`` together declare more than ``max_unpacked_bytes``
    uncompressed, and DatasetFileError for anything else that is wrong.
    """
    try:
        _check_directory_size(path)
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise DatasetFileError(f"not an .npz file (a zip of .npy arrays); {_HINT}") from None
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        _check_member_names(list(members))
        missing = [key for key in REQUIRED if f"{key}.npy" not in members]
        if missing:
            found = ", ".join(sorted(name.removesuffix(".npy") for name in members)) or "nothing"
            raise DatasetFileError(f"the .npz lacks {' and '.join(missing)} (it holds {found}); {_HINT}")
        declared = sum(members[f"{key}.npy"].file_size for key in REQUIRED)
        if declared > max_unpacked_bytes:
            raise DatasetTooLarge(f"x and y unzip to {declared} bytes, over this server's limit of "
                                  f"{max_unpacked_bytes} bytes (SMOOTHCERT_MAX_DATASET_UNPACKED_BYTES)")
        x = _read_member(archive, members["x.npy"], "x")
        y = _read_member(archive, members["y.npy"], "y")
    return DatasetArrays(check_images(x), check_labels(y, len(x)), str(x.dtype))


def _check_directory_size(path: str | Path) -> None:
    """Refuse a central directory over MAX_DIRECTORY_BYTES before zipfile reads and parses it.

    The size comes from the end record (or the zip64 end record before it) through zipfile's own
    reader, a private helper used on purpose: the check then bounds exactly what ZipFile parses.
    """
    with open(path, "rb") as f:
        end = zipfile._EndRecData(f)  # type: ignore[attr-defined]  # None without an end record
    size_field, entries_field = zipfile._ECD_SIZE, zipfile._ECD_ENTRIES_TOTAL  # type: ignore[attr-defined]
    if end is not None and end[size_field] > MAX_DIRECTORY_BYTES:
        raise DatasetFileError(f"the .npz's zip directory takes {end[size_field]} bytes "
                               f"({end[entries_field]} entries declared), over the "
                               f"{MAX_DIRECTORY_BYTES} a dataset of x and y needs; {_HINT}")


def _check_member_names(names: list[str]) -> None:
    """At most MAX_MEMBERS members, each a plain ``<key>.npy``: nothing is extracted, but a path
    such as ``../x`` or a stray file is no numpy.savez output and is refused as hostile."""
    if len(names) > MAX_MEMBERS:
        raise DatasetFileError(f"the .npz holds {len(names)} members, over {MAX_MEMBERS}; a dataset needs "
                               f"only x and y; {_HINT}")
    for name in names:
        if not _MEMBER_NAME.fullmatch(name):
            shown = name if len(name) <= 60 else name[:60] + "..."
            raise DatasetFileError(f"the .npz holds a member named {shown!r}; numpy.savez writes only "
                                   f"<key>.npy members, without folders; {_HINT}")


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> np.ndarray:
    """One ``.npy`` member, its header checked before its data is read."""
    try:
        with archive.open(info) as member:
            shape, fortran_order, dtype = _read_header(member, key)
            if dtype.hasobject or dtype.kind not in "biuf":
                raise DatasetFileError(
                    f"{key} has dtype {dtype}" + (", which holds pickled Python objects; smoothcert never "
                                                  "unpickles uploads" if dtype.hasobject else "")
                    + "; save plain numbers")
            size = math.prod(shape) * dtype.itemsize
            if member.tell() + size != info.file_size:
                raise DatasetFileError(f"{key}: its header declares shape {list(shape)} ({size} bytes of data) "
                                       f"but the member holds {info.file_size - member.tell()}")
            data = member.read(size)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression method.
        raise DatasetFileError(f"{key}: the .npz is damaged or unreadable ({exc})") from None
    if len(data) != size:
        raise DatasetFileError(f"{key}: the .npz is truncated")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")


def _read_header(member, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(member)
        if version == (1, 0):
            return fmt.read_array_header_1_0(member)
        if version == (2, 0):
            return fmt.read_array_header_2_0(member)
    except ValueError as exc:
        raise DatasetFileError(f"{key} is not a .npy array ({exc})") from None
    raise DatasetFileError(f"{key}: unsupported .npy format version {version}")


def check_images(x: np.ndarray) -> np.ndarray:
    """``x`` as contiguous float32 (N, C, H, W) in [0, 1]; DatasetFileError otherwise."""
    if x.ndim != 4 or 0 in x.shape:
        hint = " (add the channel axis: x[:, None])" if x.ndim == 3 else ""
        raise DatasetFileError(f"x must be (N, C, H, W) with no empty axis, got shape {list(x.shape)}{hint}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255)
    if x.dtype.kind != "f":
        raise DatasetFileError(f"x must hold floats in [0, 1] or uint8 pixels, not {x.dtype}")
    try:
        check_pixel_values(x, hint=" (or upload uint8 pixels, scaled by 1/255 here)")
    except PixelError as exc:
        raise DatasetFileError(f"x: {exc}") from None
    return np.ascontiguousarray(x, dtype=np.float32)


def check_labels(y: np.ndarray, count: int) -> np.ndarray:
    """``y`` as int64 (N,) of labels ≥ 0, one per image; DatasetFileError otherwise."""
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DatasetFileError(f"y must be a 1-d array of integer labels, got {y.dtype} of shape {list(y.shape)}")
    if len(y) != count:
        raise DatasetFileError(f"x holds {count} images but y holds {len(y)} labels")
    if int(y.min()) < 0 or int(y.max()) >= 2**31:
        raise DatasetFileError(f"labels must lie in [0, 2^31), found values in [{int(y.min())}, {int(y.max())}]")
    return y.astype(np.int64)
