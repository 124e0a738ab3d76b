"""DatasetStore: uploaded datasets on disk, one folder per dataset, torch-free.

Layout under ``root`` (``DATA_DIR/datasets``)::

    <id>/x.npy       (N, C, H, W) pixels in their stored dtype (dataset_files.stored_dtype): uint8
                     and uint16 as uploaded, floats in [0, 1] as float16 or float32
    <id>/y.npy       (N,) integer labels, in their uploaded integer dtype
    <id>/meta.json   the record: id, name, filename, num_inputs, input_shape [C, H, W],
                     label_range [min, max], source_dtype, size_bytes and sha256 of the
                     upload, stored_bytes (x.npy and y.npy), owner (the uploading key's caller
                     id), created_at

Datasets stored before pixels kept their dtype hold float32 and int64; :meth:`DatasetStore.load`
reads both forms. ``meta.json`` is written last (:class:`~smoothcert.service.core.store.FolderStore`
keeps ids, folders and records), so an upload in progress is invisible; ``get``, ``list`` and
``delete`` see every complete dataset. Workers read slices of ``x.npy`` memory-mapped, without
loading all, and get float32 in [0, 1].
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, ContextManager

import numpy as np

from smoothcert.service.core.dataset_files import (
    DatasetFileError,
    DatasetTooLarge,
    as_float_pixels,
    open_dataset_npz,
)
from smoothcert.service.core.store import FolderStore, copy_upload, created_at

# admit(dataset id, bytes it will store): entered once the upload's headers are checked and before
# anything of it is written; raising refuses the upload, and the block's exit ends the reservation.
Admit = Callable[[str, int], ContextManager[Any]]


class DatasetMissing(DatasetFileError):
    """The dataset was deleted (or never existed)."""


class DatasetStore(FolderStore):
    """Datasets under ``root``; safe to use from the API and the workers."""

    def add(
        self,
        src: BinaryIO,
        filename: str,
        name: str | None,
        *,
        max_bytes: int,
        max_unpacked_bytes: int,
        owner: str | None = None,
        admit: Admit | None = None,
    ) -> dict[str, Any]:
        """Check an uploaded ``.npz`` and store its arrays; return the new record.

        Raises DatasetTooLarge past ``max_bytes`` (the file) or ``max_unpacked_bytes`` (x and y
        unzipped) and DatasetFileError when the arrays are not a dataset; ``admit`` may refuse it
        by what it would store (a quota). Nothing stays on disk after a refusal. The arrays are
        checked and written block by block, so memory does not grow with the dataset.
        """
        with self.new_folder() as (dataset_id, folder):
            upload = folder / "upload.npz.part"
            sha256, size = copy_upload(
                src,
                upload,
                max_bytes,
                too_large=lambda: DatasetTooLarge(
                    f"the dataset file exceeds this server's limit of {max_bytes} bytes (SMOOTHCERT_MAX_DATASET_BYTES)"
                ),
            )
            with (
                open_dataset_npz(upload, max_unpacked_bytes) as data,
                (admit or _admit_all)(dataset_id, data.stored_bytes),
            ):
                with open(folder / "x.npy", "wb") as x_out, open(folder / "y.npy", "wb") as y_out:
                    label_range = data.store(x_out, y_out)
                upload.unlink()
                meta = {
                    "id": dataset_id,
                    "name": name or Path(filename).stem or dataset_id,
                    "filename": Path(filename).name,
                    "num_inputs": data.num_inputs,
                    "input_shape": data.input_shape,
                    "label_range": list(label_range),
                    "source_dtype": data.source_dtype,
                    "size_bytes": size,
                    "sha256": sha256,
                    "stored_bytes": data.stored_bytes,
                    "owner": owner,
                    "created_at": created_at(),
                }
                self.write(dataset_id, meta)
        return meta

    def load(self, dataset_id: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Images ``[start, stop)`` as float32 in [0, 1] (integer pixels scaled here) and their
        int64 labels; DatasetMissing after a delete."""
        try:
            x = np.load(self.file(dataset_id, "x.npy"), mmap_mode="r", allow_pickle=False)
            y = np.load(self.file(dataset_id, "y.npy"), mmap_mode="r", allow_pickle=False)
        except (KeyError, OSError):
            raise DatasetMissing(f"dataset {dataset_id} was deleted") from None
        return np.array(as_float_pixels(x[start:stop])), np.array(y[start:stop], dtype=np.int64)

    def stored_bytes(self, owner: str) -> tuple[int, list[str]]:
        """What the datasets recorded with ``owner`` take on disk, and their ids."""
        mine = [d for d in self.list() if d.get("owner") == owner]
        return sum(int(d.get("stored_bytes", 0)) for d in mine), [d["id"] for d in mine]


def _admit_all(dataset_id: str, stored_bytes: int) -> ContextManager[None]:
    return contextlib.nullcontext()
