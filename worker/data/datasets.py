"""Training data: the built-in digits, ``.npz`` arrays, image folders and CIFAR-10's binary files.

Every reader returns a :class:`Dataset` of float32 (N, C, H, W) images in [0, 1] with int64
labels, and refuses a malformed file with a one-line :class:`DatasetError` that names it.
Nothing is unpickled: an ``.npz`` is checked member by member exactly as an upload is
(:mod:`smoothcert.service.core.dataset_files`), and CIFAR-10 is read from its *binary* distribution
(``data_batch_*.bin``, ``test_batch.bin``: records of 1 label byte + 3072 pixel bytes), not from
the Python version's pickles. numpy and Pillow only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smoothcert.service.core.dataset_files import (
    DatasetFileError,
    check_images,
    check_labels,
    read_dataset_npz,
)
from smoothcert.service.core.images import (
    ImageError,
    ImageHeader,
    has_image_suffix,
    read_header,
    read_pixels,
    to_unit,
)

DIGITS = "digits"
CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32
CIFAR_CLASSES = 10
_NO_UNPACK_CAP = 1 << 62  # a local file the user names is not an upload: no size cap


class DatasetError(DatasetFileError):
    """A dataset cannot be read or used; the message names the file and says why, in one line."""


@dataclass
class Dataset:
    """Images in [0, 1] pixel space and their labels, with an optional held-out test split."""

    name: str
    x: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    y: np.ndarray  # int64 (N,)
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        try:
            self.x = check_images(np.asarray(self.x))
            self.y = check_labels(np.asarray(self.y), len(self.x))
            if (self.test_x is None) != (self.test_y is None):
                raise DatasetFileError("give both test_x and test_y, or neither")
            if self.test_x is not None:
                self.test_x = check_images(np.asarray(self.test_x))
                self.test_y = check_labels(np.asarray(self.test_y), len(self.test_x))
        except DatasetFileError as exc:
            raise DatasetError(f"{self.name}: {exc}") from None
        if self.test_x is not None:
            if self.test_x.shape[1:] != self.x.shape[1:]:
                raise DatasetError(
                    f"{self.name}: test images are {list(self.test_x.shape[1:])}, "
                    f"training images {list(self.x.shape[1:])}"
                )
        largest = max(int(self.y.max()), -1 if self.test_y is None else int(self.test_y.max()))
        if self.class_names is not None and largest >= len(self.class_names):
            raise DatasetError(
                f"{self.name}: label {largest} but only {len(self.class_names)} class names"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """The number of class names, else one more than the largest label."""
        if self.class_names is not None:
            return len(self.class_names)
        return 1 + max(int(self.y.max()), -1 if self.test_y is None else int(self.test_y.max()))

    def sha256(self) -> str:
        """Digest of the training images and labels (what a resumed run must train on again)."""
        digest = hashlib.sha256()
        digest.update(repr((self.x.shape, str(self.x.dtype))).encode())
        digest.update(np.ascontiguousarray(self.x).data)
        digest.update(np.ascontiguousarray(self.y).data)
        return digest.hexdigest()


def load_dataset(spec: str | Path) -> Dataset:
    """``digits``, an ``.npz`` file, a CIFAR-10 binary folder or ``.bin`` file, or an image folder.

    A folder holding ``data_batch_*.bin`` or ``test_batch.bin`` is CIFAR-10 (train and test
    splits); any other folder is an image folder (see :func:`read_image_folder`).
    """
    if str(spec) == DIGITS:
        return load_digits()
    path = Path(spec)
    if path.is_dir():
        if any(path.glob("data_batch_*.bin")) or (path / "test_batch.bin").is_file():
            return read_cifar10_dir(path)
        return read_image_folder(path)
    if not path.is_file():
        raise DatasetError(
            f"no such dataset: {spec} (give digits, an .npz file, an image folder or a "
            "CIFAR-10 binary folder)"
        )
    if path.suffix.lower() == ".npz":
        return read_npz(path)
    if path.suffix.lower() == ".bin":
        x, y = read_cifar10_batch(path)
        return Dataset(path.name, x, y, class_names=_cifar_class_names(path.parent))
    raise DatasetError(
        f"{path.name}: unknown dataset format (give an .npz file, a CIFAR-10 .bin file or a folder)"
    )


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits scaled to [0, 1], with the demo model's fixed split (last 20% test)."""
    from smoothcert.models.demo import load_digits_split

    x, y, test_x, test_y = load_digits_split()
    return Dataset(DIGITS, x, y, test_x, test_y, class_names=[str(d) for d in range(10)])


def read_npz(path: str | Path) -> Dataset:
    """An ``.npz`` with ``x`` (N, C, H, W), floats in [0, 1] or uint8, and ``y`` (N,) labels."""
    path = Path(path)
    try:
        arrays = read_dataset_npz(path, _NO_UNPACK_CAP)
    except DatasetFileError as exc:
        raise DatasetError(f"{path.name}: {exc}") from None
    return Dataset(path.name, arrays.x, arrays.y)


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch: float32 (N, 3, 32, 32) in [0, 1] and int64 labels."""
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD_BYTES:
        raise DatasetError(
            f"{path.name}: {raw.size} bytes is not a whole number of {CIFAR_RECORD_BYTES}-byte "
            "records (1 label byte + 3072 pixel bytes): truncated, or not CIFAR-10 binary"
        )
    records = raw.reshape(-1, CIFAR_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= CIFAR_CLASSES:
        bad = int(np.argmax(labels >= CIFAR_CLASSES))
        raise DatasetError(
            f"{path.name}: record {bad} has label byte {labels[bad]}, not a CIFAR-10 class "
            "(0-9); CIFAR-100's binary files (2 label bytes) are not supported"
        )
    images = records[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255)
    return images, labels


def read_cifar10_dir(path: str | Path) -> Dataset:
    """``data_batch_1.bin`` ... (train) and ``test_batch.bin`` (test) from one folder."""
    path = Path(path)
    batches = sorted(path.glob("data_batch_*.bin"), key=lambda p: _batch_number(p.name))
    if not batches:
        raise DatasetError(
            f"{path}: no data_batch_*.bin files (the training split of CIFAR-10's binary version)"
        )
    parts = [read_cifar10_batch(p) for p in batches]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test_x, test_y = (
        read_cifar10_batch(path / "test_batch.bin")
        if (path / "test_batch.bin").is_file()
        else (None, None)
    )
    return Dataset(path.name, x, y, test_x, test_y, class_names=_cifar_class_names(path))


def _batch_number(name: str) -> int:
    match = re.search(r"(\d+)", name)
    return int(match.group(1)) if match else 0


def _cifar_class_names(folder: Path) -> list[str] | None:
    """The names in ``batches.meta.txt`` (one per line), when the folder has it and lists ten."""
    meta = folder / "batches.meta.txt"
    if not meta.is_file():
        return None
    names = [line.strip() for line in meta.read_text(errors="replace").splitlines() if line.strip()]
    return names if len(names) == CIFAR_CLASSES else None


def read_image_folder(path: str | Path) -> Dataset:
    """One sub-folder of PNG/JPEG images per class, classes in sorted order of folder name.

    A folder whose only sub-folders are ``train`` and ``test``, each laid out that way, gives both
    splits. Images are grey when every one of them is, RGB otherwise; all must share one size
    (nothing is resized). Which images are accepted and how they are converted (16-bit grey by
    1/65535; one frame; transparency only when fully opaque; no CMYK) is
    :mod:`smoothcert.service.core.images`'s rule; every header is checked before a pixel is decoded.
    """
    path = Path(path)
    if _subfolders(path) == ["test", "train"] and all(
        _subfolders(path / split) for split in ("train", "test")
    ):
        classes = _subfolders(path / "train")
        if _subfolders(path / "test") != classes:
            raise DatasetError(f"{path}: train/ and test/ must hold the same class folders")
        x, y = _read_classes(path / "train", classes)
        test_x, test_y = _read_classes(path / "test", classes)
        if test_x.shape[1:] != x.shape[1:]:
            # one split grey, the other colour: make both colour
            x, test_x = _to_rgb(x), _to_rgb(test_x)
        return Dataset(path.name, x, y, test_x, test_y, class_names=classes)
    classes = _subfolders(path)
    x, y = _read_classes(path, classes)
    return Dataset(path.name, x, y, class_names=classes)


def _subfolders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_classes(path: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DatasetError(
            f"{path}: an image folder needs one sub-folder of PNG/JPEG images per class, "
            f"at least two (found {found})"
        )
    files: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    for label, name in enumerate(classes):
        images = sorted(p for p in (path / name).iterdir() if p.is_file() and has_image_suffix(p))
        if not images:
            raise DatasetError(f"{path / name}: no PNG or JPEG images in class folder {name!r}")
        files += images
        labels += [label] * len(images)
        names += [f"{name}/{f.name}" for f in images]
    # Every header is checked (pixel cap, frames, mode) and the sizes compared before any pixel
    # is decoded; the images are then decoded one by one into the batch.
    headers = [_read_header(f) for f in files]
    sizes = {(h.height, h.width): n for h, n in zip(headers, names)}
    if len(sizes) > 1:
        (a, na), (b, nb) = list(sizes.items())[:2]
        raise DatasetError(
            f"{path}: images differ in size ({a[1]}x{a[0]} {na}, {b[1]}x{b[0]} {nb}); "
            "resize them to one size first"
        )
    [size] = sizes
    grey = all(h.grey for h in headers)
    x = np.empty((len(files), 1 if grey else 3, *size), dtype=np.float32)
    for i, file in enumerate(files):
        pixels = to_unit(_read_image(file, "L" if grey else "RGB", size))
        x[i] = pixels if grey else pixels.transpose(2, 0, 1)
    return x, np.asarray(labels, dtype=np.int64)


def _read_header(path: Path) -> ImageHeader:
    try:
        header = read_header(path, str(path))
        header.check()
    except ImageError as exc:
        raise DatasetError(str(exc)) from None
    return header


def _read_image(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """uint8 (or, 16-bit grey, uint16) pixels: (H, W) for mode L, (H, W, 3) for RGB."""
    try:
        return read_pixels(path, str(path), mode, size)
    except ImageError as exc:
        raise DatasetError(str(exc)) from None


def _to_rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x, 3, axis=1) if x.shape[1] == 1 else x
