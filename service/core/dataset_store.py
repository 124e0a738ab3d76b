"""DatasetStore: uploaded datasets on disk, one folder per dataset, torch-free.

Layout under ``root`` (``DATA_DIR/datasets``)::

    <id>/x.npy       float32 (N, C, H, W) in [0, 1], uint8 uploads already scaled by 1/255
    <id>/y.npy       int64 (N,) labels
    <id>/meta.json   the record: id, name, filename, num_inputs, input_shape [C, H, W],
                     label_range [min, max], source_dtype, size_bytes and sha256 of the
                     upload, created_at

``meta.json`` is written last, by rename, so a folder without it (an upload in progress or one
that failed) is invisible. Workers read slices of ``x.npy`` memory-mapped, without loading all.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from smoothcert.service.core.dataset_files import DatasetFileError, DatasetTooLarge, read_dataset_npz

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class DatasetMissing(DatasetFileError):
    """The dataset was deleted (or never existed)."""


class DatasetStore:
    """Datasets under ``root``; safe to use from the API and the workers."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, dataset_id: str) -> Path:
        if not _ID.match(dataset_id or ""):
            raise KeyError(dataset_id)
        return self.root / dataset_id

    def add(self, src: BinaryIO, filename: str, name: str | None, *, max_bytes: int,
            max_unpacked_bytes: int) -> dict[str, Any]:
        """Check an uploaded ``.npz`` and store its arrays; return the new record.

        Raises DatasetTooLarge past ``max_bytes`` (the file) or ``max_unpacked_bytes`` (x and y
        unzipped) and DatasetFileError when the arrays are not a dataset; nothing stays on disk then.
        """
        dataset_id = uuid.uuid4().hex[:16]
        folder = self._dir(dataset_id)
        folder.mkdir(parents=True)
        upload = folder / "upload.npz.part"
        try:
            digest, size = hashlib.sha256(), 0
            with open(upload, "wb") as out:
                while block := src.read(1 << 20):
                    size += len(block)
                    if size > max_bytes:
                        raise DatasetTooLarge(f"the dataset file exceeds this server's limit of {max_bytes} bytes "
                                              "(SMOOTHCERT_MAX_DATASET_BYTES)")
                    digest.update(block)
                    out.write(block)
            arrays = read_dataset_npz(upload, max_unpacked_bytes)
            upload.unlink()
            np.save(folder / "x.npy", arrays.x)
            np.save(folder / "y.npy", arrays.y)
            meta = {"id": dataset_id, "name": name or Path(filename).stem or dataset_id,
                    "filename": Path(filename).name, "num_inputs": len(arrays.x),
                    "input_shape": list(arrays.x.shape[1:]),
                    "label_range": [int(arrays.y.min()), int(arrays.y.max())],
                    "source_dtype": arrays.source_dtype, "size_bytes": size, "sha256": digest.hexdigest(),
                    "created_at": round(time.time(), 3)}
            tmp = folder / f"meta.json.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
            os.replace(tmp, folder / "meta.json")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return meta

    def get(self, dataset_id: str) -> dict[str, Any] | None:
        """The record, or None when there is no such (complete) dataset."""
        try:
            return json.loads((self._dir(dataset_id) / "meta.json").read_text())
        except (KeyError, OSError, ValueError):
            return None

    def list(self) -> list[dict[str, Any]]:
        """Every dataset, oldest first."""
        if not self.root.is_dir():
            return []
        records = (self.get(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted((r for r in records if r), key=lambda r: r.get("created_at", 0))

    def delete(self, dataset_id: str) -> bool:
        """Remove the dataset's folder; False when there was none."""
        if self.get(dataset_id) is None:
            return False
        shutil.rmtree(self._dir(dataset_id), ignore_errors=True)
        return True

    def load(self, dataset_id: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Images ``[start, stop)`` (float32) and their labels; DatasetMissing after a delete."""
        try:
            folder = self._dir(dataset_id)
            x = np.load(folder / "x.npy", mmap_mode="r", allow_pickle=False)
            y = np.load(folder / "y.npy", allow_pickle=False)
        except (KeyError, OSError):
            raise DatasetMissing(f"dataset {dataset_id} was deleted") from None
        return np.array(x[start:stop], dtype=np.float32), y[start:stop]
