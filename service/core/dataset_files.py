"""Reading an uploaded dataset: an ``.npz`` (numpy.savez) holding ``x`` and ``y``, never unpickled.

``x`` is (N, C, H, W): floats in [0, 1], or uint8 or uint16 pixels (scaled by 1/255 or 1/65535
when read); ``y`` holds N integer labels ≥ 0. An ``.npz`` is a zip of ``.npy`` members, so an
upload could be a zip bomb or carry a pickle. Defences, in order: the zip's central directory
(which zipfile parses whole when it opens the file) must be small, so a file of millions of empty
entries costs nothing; the members must be few and plain ``<key>.npy`` names, as numpy.savez
writes them (no ``../x``, no folders); the members' declared uncompressed sizes are checked
against a cap before anything is unzipped; each member's ``.npy`` header is read on its own and
must declare a plain numeric dtype (object arrays are pickles) whose data size matches the
member's size, and the shapes and dtypes of x and y must make a dataset; only then is the data
read, in blocks of ``BLOCK_BYTES``, each checked and written out before the next is unzipped, and
zipfile stops at the declared size and checks the CRC. Nothing is ever extracted to disk as it
came, and no whole array is ever held in memory by :meth:`DatasetFile.store`.

Stored form (:func:`stored_dtype`): integer pixels and float16/float32 keep their dtype, wider
floats become float32, labels keep their integer dtype, all in native byte order, so what is
stored is never larger than what was uploaded unzipped; :func:`as_float_pixels` turns stored
pixels into the float32 [0, 1] every model takes, the same values the upload's own scaling gives.
numpy only.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from smoothcert.models.pixels import PixelError, check_pixel_values

REQUIRED = ("x", "y")
MAX_MEMBERS = 64  # numpy.savez writes one member per array; a dataset needs two
MAX_DIRECTORY_BYTES = 64 << 10  # ample for MAX_MEMBERS entries with long names
_MEMBER_NAME = re.compile(r"[^/\\\x00]+\.npy")
_HINT = "save it with numpy.savez(path, x=images, y=labels)"
BLOCK_BYTES = 1 << 20  # what the checks and the writer hold of a member at a time
PIXEL_SCALES = {
    "uint8": 255,
    "uint16": 65535,
}  # integer pixels: stored as uploaded, scaled when read
_FLOAT_HINT = " (or upload uint8 pixels, scaled by 1/255 here)"


class DatasetFileError(ValueError):
    """The upload is not a usable dataset; the message says why, in one line."""


class DatasetTooLarge(DatasetFileError):
    """The upload, or what it unzips to, exceeds a size cap."""


class DatasetArrays(NamedTuple):
    x: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    y: np.ndarray  # int64 (N,), ≥ 0
    source_dtype: str  # x's dtype as uploaded


def read_dataset_npz(path: str | Path, max_unpacked_bytes: int) -> DatasetArrays:
    """The checked arrays of the ``.npz`` at ``path``, in memory, x as float32 in [0, 1].

    Raises DatasetTooLarge when ``x`` and ``y`` together declare more than ``max_unpacked_bytes``
    uncompressed, and DatasetFileError for anything else that is wrong.
    """
    x_out, y_out = io.BytesIO(), io.BytesIO()
    with open_dataset_npz(path, max_unpacked_bytes) as data:
        data.store(x_out, y_out)
        source_dtype = data.source_dtype
    x_out.seek(0)
    y_out.seek(0)
    x, y = np.load(x_out, allow_pickle=False), np.load(y_out, allow_pickle=False)
    return DatasetArrays(np.ascontiguousarray(as_float_pixels(x)), y.astype(np.int64), source_dtype)


class _Member(NamedTuple):
    info: zipfile.ZipInfo
    key: str
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype  # as uploaded
    data_offset: int  # bytes of .npy header before the data
    stored: np.dtype  # as written by DatasetFile.store

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    def stored_header(self) -> bytes:
        out = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            out,
            {
                "descr": np.lib.format.dtype_to_descr(self.stored),
                "fortran_order": self.fortran_order,
                "shape": self.shape,
            },
        )
        return out.getvalue()

    def stored_bytes(self) -> int:
        return len(self.stored_header()) + self.elements * self.stored.itemsize


def open_dataset_npz(path: str | Path, max_unpacked_bytes: int) -> DatasetFile:
    """The ``.npz`` at ``path`` with its structure and ``.npy`` headers checked, its data unread.

    Raises DatasetTooLarge past ``max_unpacked_bytes`` (x and y as declared) and DatasetFileError
    for a file that is no dataset. Use the answer as a context manager: it holds the zip open.
    """
    try:
        _check_directory_size(path)
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise DatasetFileError(f"not an .npz file (a zip of .npy arrays); {_HINT}") from None
    try:
        return DatasetFile(archive, max_unpacked_bytes)
    except BaseException:
        archive.close()
        raise


class DatasetFile:
    """An ``.npz`` dataset whose zip structure and ``.npy`` headers passed every check; see
    :func:`open_dataset_npz`. ``stored_bytes`` is what :meth:`store` will write, known before it does."""

    def __init__(self, archive: zipfile.ZipFile, max_unpacked_bytes: int):
        self.archive = archive
        members = {info.filename: info for info in archive.infolist()}
        _check_member_names(list(members))
        missing = [key for key in REQUIRED if f"{key}.npy" not in members]
        if missing:
            found = ", ".join(sorted(name.removesuffix(".npy") for name in members)) or "nothing"
            raise DatasetFileError(
                f"the .npz lacks {' and '.join(missing)} (it holds {found}); {_HINT}"
            )
        declared = sum(members[f"{key}.npy"].file_size for key in REQUIRED)
        if declared > max_unpacked_bytes:
            raise DatasetTooLarge(
                f"x and y unzip to {declared} bytes, over this server's limit of "
                f"{max_unpacked_bytes} bytes (SMOOTHCERT_MAX_DATASET_UNPACKED_BYTES)"
            )
        self.x = _member_header(archive, members["x.npy"], "x")
        self.y = _member_header(archive, members["y.npy"], "y")
        _check_image_layout(self.x.shape, self.x.dtype)
        _check_label_layout(self.y.shape, self.y.dtype, self.x.shape[0])
        self.x = self.x._replace(stored=stored_dtype(self.x.dtype))
        self.y = self.y._replace(stored=self.y.dtype.newbyteorder("="))

    def __enter__(self) -> DatasetFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.archive.close()

    @property
    def num_inputs(self) -> int:
        return self.x.shape[0]

    @property
    def input_shape(self) -> list[int]:
        return list(self.x.shape[1:])

    @property
    def source_dtype(self) -> str:
        return str(self.x.dtype)

    @property
    def stored_bytes(self) -> int:
        return self.x.stored_bytes() + self.y.stored_bytes()

    def store(self, x_out: BinaryIO, y_out: BinaryIO) -> tuple[int, int]:
        """Write x and y as ``.npy`` files (their stored form) while checking their values; return
        the labels' [min, max]. Raises DatasetFileError at the first value that is wrong (the
        outputs then hold part of the data: the caller throws them away)."""
        if self.x.dtype.kind == "f":
            low, high = self._copy(self.x, x_out, _finite_pixels)
            try:
                check_pixel_values(np.array([low, high]), hint=_FLOAT_HINT)
            except PixelError as exc:
                raise DatasetFileError(f"x: {exc}") from None
        else:
            self._copy(self.x, x_out, None)
        low, high = self._copy(self.y, y_out, None)
        _check_label_range(int(low), int(high))
        return int(low), int(high)

    def _copy(
        self, m: _Member, out: BinaryIO, check: Callable[[np.ndarray], None] | None
    ) -> tuple[float, float]:
        """Stream member ``m`` to ``out`` in its stored form, ``check(block)`` on each block; the
        smallest and largest value seen."""
        out.write(m.stored_header())
        low, high = math.inf, -math.inf
        per_block = max(1, BLOCK_BYTES // m.dtype.itemsize)
        with _reading(m.key):
            member = self.archive.open(m.info)
        with member:
            with _reading(m.key):
                member.read(m.data_offset)
            left = m.elements
            while left:
                size = min(left, per_block) * m.dtype.itemsize
                with _reading(m.key):
                    data = member.read(size)
                if len(data) != size:
                    raise DatasetFileError(f"{m.key}: the .npz is truncated")
                block = np.frombuffer(data, dtype=m.dtype)
                if check is not None:
                    check(block)
                low, high = min(low, block.min().item()), max(high, block.max().item())
                out.write(data if m.stored == m.dtype else block.astype(m.stored).tobytes())
                left -= len(block)
        return low, high


@contextlib.contextmanager
def _reading(key: str) -> Iterator[None]:
    """Turn what zipfile and zlib raise on a damaged member into one DatasetFileError."""
    try:
        yield
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        OSError,
        NotImplementedError,
        RuntimeError,
    ) as exc:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression method.
        raise DatasetFileError(f"{key}: the .npz is damaged or unreadable ({exc})") from None


def stored_dtype(dtype: np.dtype) -> np.dtype:
    """How pixels of ``dtype`` are kept on disk: as they are (uint8, uint16, float16, float32),
    float32 for wider floats; native byte order."""
    if dtype.kind == "f" and dtype.itemsize > 4:
        return np.dtype(np.float32)
    return dtype.newbyteorder("=")


def as_float_pixels(x: np.ndarray) -> np.ndarray:
    """Stored or uploaded pixels as float32 in [0, 1]: integer pixels divided by their scale in
    float32, floats cast (the values the upload's own conversion always gave)."""
    scale = PIXEL_SCALES.get(x.dtype.name)
    if scale is not None:
        return np.asarray(x, dtype=np.float32) / np.float32(scale)
    return np.asarray(x, dtype=np.float32)


def _finite_pixels(block: np.ndarray) -> None:
    if not np.isfinite(block).all():
        try:
            check_pixel_values(block, hint=_FLOAT_HINT)
        except PixelError as exc:
            raise DatasetFileError(f"x: {exc}") from None


def _check_directory_size(path: str | Path) -> None:
    """Refuse a central directory over MAX_DIRECTORY_BYTES before zipfile reads and parses it.

    The size comes from the end record (or the zip64 end record before it) through zipfile's own
    reader, a private helper used on purpose: the check then bounds exactly what ZipFile parses.
    """
    with open(path, "rb") as f:
        end = zipfile._EndRecData(f)  # type: ignore[attr-defined]  # None without an end record
    size_field, entries_field = zipfile._ECD_SIZE, zipfile._ECD_ENTRIES_TOTAL  # type: ignore[attr-defined]
    if end is not None and end[size_field] > MAX_DIRECTORY_BYTES:
        raise DatasetFileError(
            f"the .npz's zip directory takes {end[size_field]} bytes "
            f"({end[entries_field]} entries declared), over the "
            f"{MAX_DIRECTORY_BYTES} a dataset of x and y needs; {_HINT}"
        )


def _check_member_names(names: list[str]) -> None:
    """At most MAX_MEMBERS members, each a plain ``<key>.npy``: nothing is extracted, but a path
    such as ``../x`` or a stray file is no numpy.savez output and is refused as hostile."""
    if len(names) > MAX_MEMBERS:
        raise DatasetFileError(
            f"the .npz holds {len(names)} members, over {MAX_MEMBERS}; a dataset needs "
            f"only x and y; {_HINT}"
        )
    for name in names:
        if not _MEMBER_NAME.fullmatch(name):
            shown = name if len(name) <= 60 else name[:60] + "..."
            raise DatasetFileError(
                f"the .npz holds a member named {shown!r}; numpy.savez writes only "
                f"<key>.npy members, without folders; {_HINT}"
            )


def _member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> _Member:
    """One ``.npy`` member's header, checked against the member's size; no data is read."""
    with _reading(key):
        with archive.open(info) as member:
            shape, fortran_order, dtype = _read_header(member, key)
            offset = member.tell()
    if dtype.hasobject or dtype.kind not in "biuf":
        raise DatasetFileError(
            f"{key} has dtype {dtype}"
            + (
                ", which holds pickled Python objects; smoothcert never unpickles uploads"
                if dtype.hasobject
                else ""
            )
            + "; save plain numbers"
        )
    size = math.prod(shape) * dtype.itemsize
    if offset + size != info.file_size:
        raise DatasetFileError(
            f"{key}: its header declares shape {list(shape)} ({size} bytes of data) "
            f"but the member holds {info.file_size - offset}"
        )
    return _Member(info, key, tuple(shape), bool(fortran_order), dtype, offset, dtype)


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
    _check_image_layout(x.shape, x.dtype)
    if x.dtype.kind == "f":
        try:
            check_pixel_values(x, hint=_FLOAT_HINT)
        except PixelError as exc:
            raise DatasetFileError(f"x: {exc}") from None
    return np.ascontiguousarray(as_float_pixels(x))


def check_labels(y: np.ndarray, count: int) -> np.ndarray:
    """``y`` as int64 (N,) of labels ≥ 0, one per image; DatasetFileError otherwise."""
    _check_label_layout(y.shape, y.dtype, count)
    _check_label_range(int(y.min()), int(y.max()))
    return y.astype(np.int64)


def _check_image_layout(shape: tuple[int, ...], dtype: np.dtype) -> None:
    if len(shape) != 4 or 0 in shape:
        hint = " (add the channel axis: x[:, None])" if len(shape) == 3 else ""
        raise DatasetFileError(
            f"x must be (N, C, H, W) with no empty axis, got shape {list(shape)}{hint}"
        )
    if dtype.kind != "f" and dtype.name not in PIXEL_SCALES:
        raise DatasetFileError(
            f"x must hold floats in [0, 1] or uint8 pixels (or uint16, scaled by 1/65535), "
            f"not {dtype}"
        )


def _check_label_layout(shape: tuple[int, ...], dtype: np.dtype, count: int) -> None:
    if len(shape) != 1 or dtype.kind not in "iu":
        raise DatasetFileError(
            f"y must be a 1-d array of integer labels, got {dtype} of shape {list(shape)}"
        )
    if shape[0] != count:
        raise DatasetFileError(f"x holds {count} images but y holds {shape[0]} labels")


def _check_label_range(low: int, high: int) -> None:
    if low < 0 or high >= 2**31:
        raise DatasetFileError(f"labels must lie in [0, 2^31), found values in [{low}, {high}]")
