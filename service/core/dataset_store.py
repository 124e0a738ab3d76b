"""DatasetStore: uploaded datasets on disk, one folder per dataset, torch-free.

Layout under ``root`` (``DATA_DIR/datasets``)::

    <id>/x.npy       (N, C, H, W) pixels in their stored dtype (dataset_files.stored_dtype): uint8
                     and uint16 as uploaded, floats in [0, 1] as float16 or float32
    <id>/y.npy       (N,) integer labels, in their uploaded integer dtype
    <id>/meta.json   the record: id, name, filename, num_inputs, input_shape [C, H, W],
                     label_range [min, max], source_dtype, size_bytes and sha256 of the
                     upload, stored_bytes (x.npy and y.npy), disk_bytes (what the folder takes
                     on disk: :func:`disk_bytes`), owner (the uploading key's account),
                     created_at

Datasets stored before pixels kept their dtype hold float32 and int64; :meth:`DatasetStore.load`
reads both forms. ``meta.json`` is written last (:class:`~smoothcert.service.core.store.FolderStore`
keeps ids, folders and records), so an upload in progress is invisible; ``get``, ``list`` and
``delete`` see every complete dataset. Workers read slices of ``x.npy`` memory-mapped, without
loading all, and get float32 in [0, 1].

The API's store keeps a :class:`~smoothcert.service.core.dataset_index.DatasetIndex` beside the
folders: an upload claims a place among its key's datasets (``max_count``) before it writes, and
is indexed once its record is written; a delete drops it from the index first. The storage quota
(:meth:`DatasetStore.stored_bytes`) and the listing (:meth:`DatasetStore.page`) then read the
index, not every record. What a dataset counts against the quota is what it takes on disk: each of
x.npy, y.npy and meta.json, and the folder, rounded up to whole blocks of the file system, so a
one-image dataset counts four blocks (16 KiB on most file systems), not its 300 bytes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, ContextManager

import numpy as np
import redis

from smoothcert.models.metadata import MAX_NAME_CHARS, ModelError, check_name
from smoothcert.service.core.certificates import npy_files_digest
from smoothcert.service.core.dataset_files import (
    DatasetFileError,
    DatasetTooLarge,
    as_float_pixels,
    open_dataset_npz,
)
from smoothcert.service.core.dataset_index import DatasetIndex, entry_id, listing_entry
from smoothcert.service.core.keys import account_of
from smoothcert.service.core.store import (
    FolderStore,
    block_size,
    copy_upload,
    created_at,
    disk_bytes,
)

# admit(dataset id, bytes it will take on disk): entered once the upload's headers are checked and
# before anything of it is written; raising refuses the upload, and the block's exit ends the
# reservation.
Admit = Callable[[str, int], ContextManager[Any]]


class DatasetMissing(DatasetFileError):
    """The dataset was deleted (or never existed)."""


class TooManyDatasets(DatasetFileError):
    """The uploading key already has its most datasets (SMOOTHCERT_MAX_DATASETS_PER_KEY)."""


class DatasetStore(FolderStore):
    """Datasets under ``root``; safe to use from the API and the workers. With a Redis client
    (the API's), it keeps the index of the module docstring there."""

    def __init__(self, root: str | Path, client: redis.Redis | None = None):
        super().__init__(root)
        self.index = None if client is None else DatasetIndex(client, self._on_disk)

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
        max_count: int | None = None,
    ) -> dict[str, Any]:
        """Check an uploaded ``.npz`` and store its arrays; return the new record.

        Raises DatasetTooLarge past ``max_bytes`` (the file) or ``max_unpacked_bytes`` (x and y
        unzipped), TooManyDatasets when ``owner`` already has ``max_count`` datasets (stored or
        being uploaded; with an index only), and DatasetFileError when the arrays are not a
        dataset or ``name`` (or the file name it defaults to) is not a name; ``admit`` may refuse
        it by what it would take on disk (a quota). Nothing stays on disk after a refusal. The
        arrays are checked and written block by block, so memory does not grow with the dataset.
        """
        filename = Path(filename).name
        try:
            check_name(filename, "the file name")
            name = check_name(name or Path(filename).stem[:MAX_NAME_CHARS], "the dataset's name")
        except ModelError as exc:
            raise DatasetFileError(str(exc)) from None
        with self.new_folder() as (dataset_id, folder), self._claimed(owner, dataset_id, max_count):
            upload = folder / "upload.npz.part"
            sha256, size = copy_upload(
                src,
                upload,
                max_bytes,
                too_large=lambda: DatasetTooLarge(
                    f"the dataset file exceeds this server's limit of {max_bytes} bytes (SMOOTHCERT_MAX_DATASET_BYTES)"
                ),
            )
            with open_dataset_npz(upload, max_unpacked_bytes) as data:
                meta: dict[str, Any] = {
                    "id": dataset_id,
                    "name": name or dataset_id,
                    "filename": filename,
                    "num_inputs": data.num_inputs,
                    "input_shape": data.input_shape,
                    "source_dtype": data.source_dtype,
                    "size_bytes": size,
                    "sha256": sha256,
                    "stored_bytes": data.stored_bytes,
                    "owner": owner,
                }
                # meta.json as large as it can get once the fields known after storing are in
                widest = {
                    **meta,
                    "label_range": [-(2**63), 2**63],
                    "created_at": 1e10,
                    "arrays_sha256": "0" * 64,
                }
                sizes = [data.x.stored_bytes(), data.y.stored_bytes(), _record_size(widest) + 32]
                meta["disk_bytes"] = on_disk = disk_bytes(sizes, block_size(folder))
                with (admit or _admit_all)(dataset_id, on_disk):
                    with (
                        open(folder / "x.npy", "wb") as x_out,
                        open(folder / "y.npy", "wb") as y_out,
                    ):
                        meta["label_range"] = list(data.store(x_out, y_out))
                    upload.unlink()
                    meta["arrays_sha256"] = self.arrays_sha256(dataset_id)
                    meta["created_at"] = created_at()
                    self.write(dataset_id, meta)
                    if self.index is not None:  # inside the block: a failure removes the dataset
                        self.index.add(meta, on_disk)
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

    def arrays_sha256(self, dataset_id: str) -> str:
        """The digest of the dataset's arrays as stored (:func:`~smoothcert.service.core.
        certificates.arrays_digest`), which certificates name; DatasetMissing after a delete."""
        try:
            files = {name: self.file(dataset_id, f"{name}.npy") for name in ("x", "y")}
            return npy_files_digest(files)  # read in blocks: memory does not grow with the data
        except (KeyError, OSError):
            raise DatasetMissing(f"dataset {dataset_id} was deleted") from None

    def stored_bytes(self, owner: str) -> tuple[int, list[str]]:
        """What the datasets recorded with ``owner`` take on disk, and their ids: from the index
        when the store has one, else from every record."""
        if self.index is not None:
            return self.index.stored(owner)
        mine = [(d, size) for d, size in self._on_disk() if account_of(d.get("owner")) == owner]
        return sum(size for _, size in mine), [d["id"] for d, _ in mine]

    def page(
        self, after: str | None, limit: int, owner: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Up to ``limit`` records of every dataset or of ``owner``'s account, newest first, after
        the listing entry ``after`` (a previous page's cursor); and the next page's cursor, None
        after the last page. Needs the index. Entries whose record is gone are dropped, so a page
        may hold fewer than ``limit``."""
        assert self.index is not None, "a listing needs the store's index"
        entries, cursor = self.index.page(after, limit, owner)
        records, gone = [], []
        for entry in entries:
            record = self.get(entry_id(entry))
            if record is None or listing_entry(record) != entry:
                gone.append(entry)
            else:
                records.append(record)
        self.index.drop_entries(gone, owner)
        return records, cursor

    def delete(self, record_id: str) -> bool:
        """Remove a dataset: its index entries first (module docstring), then its folder."""
        record = self.read(record_id)
        if record is None:
            return False
        if self.index is not None:
            self.index.remove(record)
        return super().delete(record_id)

    @contextlib.contextmanager
    def _claimed(self, owner: str | None, dataset_id: str, most: int | None) -> Iterator[None]:
        """Hold ``owner``'s claim on a place for ``dataset_id`` while the block stores it (given
        back if it fails); TooManyDatasets when there is none. Nothing to hold without an index,
        an owner or a ``most``."""
        if self.index is None or owner is None or most is None:
            yield
            return
        ok, count = self.index.claim(owner, dataset_id, most)
        if not ok:
            raise TooManyDatasets(
                f"this API key already has {count} datasets stored or being uploaded, its most is "
                f"{most} (SMOOTHCERT_MAX_DATASETS_PER_KEY); delete datasets it no longer needs "
                "(DELETE /v1/datasets/{id})"
            )
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):  # else the claim lapses
                self.index.give_back(owner, dataset_id)
            raise

    def _on_disk(self) -> Iterator[tuple[dict[str, Any], int]]:
        """Every record with what its folder takes on disk (measured for a record from before
        ``disk_bytes`` was recorded)."""
        for record in self.list():
            size = record.get("disk_bytes")
            if not isinstance(size, int):
                try:
                    folder = self.folder(record["id"])
                    files = [p.stat().st_size for p in folder.iterdir() if p.is_file()]
                    size = disk_bytes(files, block_size(folder))
                except (KeyError, OSError):
                    continue
            yield record, size


def _record_size(record: dict[str, Any]) -> int:
    """The bytes of ``record`` as :meth:`FolderStore.write` writes it."""
    return len(json.dumps(record, indent=2, sort_keys=True).encode())


def _admit_all(dataset_id: str, stored_bytes: int) -> ContextManager[None]:
    return contextlib.nullcontext()
