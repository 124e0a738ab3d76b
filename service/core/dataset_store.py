"""DatasetStore: uploaded datasets on disk, one folder per dataset, torch-free.

Layout under ``root`` (``DATA_DIR/datasets``)::

    <id>/x.npy       float32 (N, C, H, W) in [0, 1], uint8 uploads already scaled by 1/255
    <id>/y.npy       int64 (N,) labels
    <id>/meta.json   the record: id, name, filename, num_inputs, input_shape [C, H, W],
                     label_range [min, max], source_dtype, size_bytes and sha256 of the
                     upload, created_at

``meta.json`` is written last (:class:`~smoothcert.service.core.store.FolderStore` keeps ids,
folders and records), so an upload in progress is invisible; ``get``, ``list`` and ``delete``
see every complete dataset. Workers read slices of ``x.npy`` memory-mapped, without loading all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from smoothcert.service.core.dataset_files import DatasetFileError, DatasetTooLarge, read_dataset_npz
from smoothcert.service.core.store import FolderStore, copy_upload, created_at


class DatasetMissing(DatasetFileError):
    """The dataset was deleted (or never existed)."""


class DatasetStore(FolderStore):
    """Datasets under ``root``; safe to use from the API and the workers."""

    def add(self, src: BinaryIO, filename: str, name: str | None, *, max_bytes: int,
            max_unpacked_bytes: int) -> dict[str, Any]:
        """Check an uploaded ``.npz`` and store its arrays; return the new record.

        Raises DatasetTooLarge past ``max_bytes`` (the file) or ``max_unpacked_bytes`` (x and y
        unzipped) and DatasetFileError when the arrays are not a dataset; nothing stays on disk then.
        """
        with self.new_folder() as (dataset_id, folder):
            upload = folder / "upload.npz.part"
            sha256, size = copy_upload(src, upload, max_bytes, too_large=lambda: DatasetTooLarge(
                f"the dataset file exceeds this server's limit of {max_bytes} bytes (SMOOTHCERT_MAX_DATASET_BYTES)"))
            arrays = read_dataset_npz(upload, max_unpacked_bytes)
            upload.unlink()
            np.save(folder / "x.npy", arrays.x)
            np.save(folder / "y.npy", arrays.y)
            meta = {"id": dataset_id, "name": name or Path(filename).stem or dataset_id,
                    "filename": Path(filename).name, "num_inputs": len(arrays.x),
                    "input_shape": list(arrays.x.shape[1:]),
                    "label_range": [int(arrays.y.min()), int(arrays.y.max())],
                    "source_dtype": arrays.source_dtype, "size_bytes": size, "sha256": sha256,
                    "created_at": created_at()}
            self.write(dataset_id, meta)
        return meta

    def load(self, dataset_id: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Images ``[start, stop)`` (float32) and their labels; DatasetMissing after a delete."""
        try:
            x = np.load(self.file(dataset_id, "x.npy"), mmap_mode="r", allow_pickle=False)
            y = np.load(self.file(dataset_id, "y.npy"), allow_pickle=False)
        except (KeyError, OSError):
            raise DatasetMissing(f"dataset {dataset_id} was deleted") from None
        return np.array(x[start:stop], dtype=np.float32), y[start:stop]
