"""ModelStore: uploaded models on disk, one folder per model, torch-free.

Layout under ``root`` (``DATA_DIR/models``)::

    <id>/model.onnx | model.safetensors   the weights, exactly as uploaded
    <id>/meta.json                        the model record (see below)

The record holds ``id``, ``status`` ("pending" until a worker loaded the model and ran one
batch, then "ready"), ``name``, ``format``, ``filename``, ``size_bytes``, ``sha256``,
``created_at``, ``owner`` (the account that uploaded it) and ``visibility`` ("private" or
"public"; :func:`~smoothcert.service.core.owners.visibility` reads a record from before), and the
loader's fields (``arch``, ``input_shape``, ``num_classes``,
``class_names``, ``normalization``, ``sigma``); ``list()`` returns the ready ones, oldest first.
A denoiser's record says ``kind: "denoiser"`` (its loader found so) and has no class count. A
pipeline (:meth:`ModelStore.add_pipeline`) is a record without weights of its own: ``kind:
"pipeline"``, the ids of its ``denoiser`` and ``classifier``, ``parts`` (each part's id, name,
sha256, format, arch), the classifier's input shape, classes and normalization, and ``sha256`` =
:func:`~smoothcert.models.metadata.pipeline_sha256` of the parts' digests.
Ids, folders and atomic records are :class:`~smoothcert.service.core.store.FolderStore`'s.
Pickled checkpoints, and safetensors files whose header lies about their tensors, are refused
before anything is kept: a worker never sees them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from smoothcert.models.metadata import (
    DENOISER,
    MAX_NAME_CHARS,
    PIPELINE,
    ModelError,
    pipeline_sha256,
)
from smoothcert.models.safetensors_header import looks_pickled, read_safetensors_header
from smoothcert.service.core.store import (
    FolderStore,
    account_of,
    block_size,
    copy_upload,
    created_at,
    disk_bytes,
)

FORMATS = {".onnx": "onnx", ".safetensors": "safetensors"}
PENDING, READY = "pending", "ready"
PUBLIC, PRIVATE = "public", "private"
VISIBILITIES = (PRIVATE, PUBLIC)


def visibility(model: Mapping[str, Any]) -> str:
    """A model record's visibility: as recorded, else public for a record without an owner (from
    before ownership; every key could use it) and private for one with an owner."""
    recorded = model.get("visibility")
    if recorded in VISIBILITIES:
        return str(recorded)
    return PRIVATE if model.get("owner") else PUBLIC


class UploadTooLarge(ModelError):
    """The upload exceeds the size cap."""


def detect_format(filename: str, head: bytes) -> str:
    """ "onnx" or "safetensors" from the file name and its first (at least 9) bytes; ModelError otherwise."""
    if looks_pickled(head):
        raise ModelError(
            f"{filename} is a pickled PyTorch checkpoint; smoothcert never unpickles model files "
            "(that runs the uploader's code); convert it to safetensors or export it to ONNX"
        )
    suffix = Path(filename or "").suffix.lower()
    if suffix not in FORMATS:
        raise ModelError(
            f"unsupported model file {filename!r}: upload a .onnx file or a .safetensors file "
            "with an allow-listed arch"
        )
    return FORMATS[suffix]


class ModelStore(FolderStore):
    """Models under ``root``; every method is safe to call from the API and the worker."""

    def weights_path(self, model_id: str) -> Path:
        """The stored weights file of ``model_id``; KeyError when there is no such model."""
        meta = self.get(model_id, include_pending=True)
        if meta is None:
            raise KeyError(model_id)
        return self.file(model_id, f"model.{meta['format']}")

    def add(
        self, src: BinaryIO, filename: str, fields: dict[str, Any], *, max_bytes: int | None = None
    ) -> dict[str, Any]:
        """Copy an upload into a new pending model and return its record.

        ``fields`` are the user's metadata (name, arch, input_shape, ...), stored as given for the
        worker's loader to check. Raises ModelError for a pickle, an unknown format or a lying
        safetensors header, and UploadTooLarge past ``max_bytes``; nothing is left on disk then.
        """
        head = src.read(9)
        fmt = detect_format(filename, head)
        with self.new_folder() as (model_id, folder):
            weights = folder / f"model.{fmt}"
            sha256, size = copy_upload(
                src,
                weights,
                max_bytes,
                head=head,
                too_large=lambda: UploadTooLarge(
                    f"the model file exceeds the {max_bytes}-byte upload limit"
                ),
            )
            if fmt == "safetensors":
                # Plain Python that reads the header only: offsets beyond the file, overlapping
                # tensors or a huge header length are refused here, without a worker.
                read_safetensors_header(weights)
            meta = {
                **{k: v for k, v in fields.items() if v is not None},
                "id": model_id,
                "status": PENDING,
                "format": fmt,
                "filename": Path(filename).name,
                "size_bytes": size,
                "sha256": sha256,
                "created_at": created_at(),
            }
            meta.setdefault("name", Path(filename).stem)
            self.write(model_id, meta)
        return meta

    def get(self, model_id: str, *, include_pending: bool = False) -> dict[str, Any] | None:
        """The record, or None when absent (or still pending, unless ``include_pending``)."""
        meta = self.read(model_id)
        return (
            meta if meta is not None and (include_pending or meta.get("status") == READY) else None
        )

    def update(self, model_id: str, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the record (e.g. status=READY and the loader's findings)."""
        meta = self.get(model_id, include_pending=True)
        if meta is None:
            raise KeyError(model_id)
        meta.update(fields)
        self.write(model_id, meta)
        return meta

    def add_pipeline(
        self,
        denoiser: dict[str, Any],
        classifier: dict[str, Any],
        name: str | None = None,
        owner: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Record a new pending pipeline of two ready records; ModelError (:func:`check_pipeline`)
        when they cannot be one. ``owner``: the record's ``owner`` and ``visibility`` fields."""
        check_pipeline(denoiser, classifier)
        parts = {
            role: {k: meta.get(k) for k in ("id", "name", "sha256", "format", "arch")}
            for role, meta in (("denoiser", denoiser), ("classifier", classifier))
        }
        with self.new_folder() as (model_id, _):
            meta = {
                "id": model_id,
                "kind": PIPELINE,
                "status": PENDING,
                "format": PIPELINE,
                "name": name
                or f"{denoiser.get('name')} + {classifier.get('name')}"[:MAX_NAME_CHARS],
                "denoiser": denoiser["id"],
                "classifier": classifier["id"],
                "parts": parts,
                "sha256": pipeline_sha256(denoiser["sha256"], classifier["sha256"]),
                "size_bytes": int(denoiser.get("size_bytes", 0))
                + int(classifier.get("size_bytes", 0)),
                "created_at": created_at(),
                **(owner or {}),
                **{
                    k: classifier[k]
                    for k in ("input_shape", "num_classes", "class_names", "normalization")
                    if classifier.get(k) is not None
                },
                **({"sigma": denoiser["sigma"]} if denoiser.get("sigma") is not None else {}),
            }
            self.write(model_id, meta)
        return meta

    def disk_bytes(self, model_id: str) -> int:
        """What model ``model_id``'s folder (its file and record) takes on disk, in whole blocks
        of the file system, as a dataset's is counted; 0 when it has none."""
        try:
            folder = self.folder(model_id)
            files = [p.stat().st_size for p in folder.iterdir() if p.is_file()]
            return disk_bytes(files, block_size(folder))
        except (KeyError, OSError):
            return 0

    def stored_bytes(self, owner: str) -> tuple[int, list[str]]:
        """What the models of account ``owner`` take on disk (pending ones too: an upload being
        checked is on disk already), and their ids; for its storage quota."""
        total, ids = 0, []
        folders = self.root.iterdir() if self.root.is_dir() else iter(())
        for folder in folders:
            record = self.read(folder.name)
            if record is None or account_of(record.get("owner")) != owner:
                continue
            total += self.disk_bytes(record["id"])
            ids.append(record["id"])
        return total, ids

    def pipelines_using(self, model_id: str) -> list[str]:
        """The ids of the stored pipelines that have ``model_id`` as a part."""
        return [
            m["id"]
            for m in self.list()
            if m.get("kind") == PIPELINE and model_id in (m.get("denoiser"), m.get("classifier"))
        ]


def check_pipeline(denoiser: dict[str, Any], classifier: dict[str, Any]) -> None:
    """ModelError (one line) unless ``denoiser`` is a denoiser's record, ``classifier`` a
    classifier's (neither a pipeline) and both take images of the same shape."""
    for role, meta in (("denoiser", denoiser), ("classifier", classifier)):
        if meta.get("kind") == PIPELINE:
            raise ModelError(
                f"model {meta['id']} is itself a pipeline; a pipeline's {role} must be a single model"
            )
    if denoiser.get("kind") != DENOISER:
        raise ModelError(
            f"model {denoiser['id']} is not a denoiser (it outputs class scores, not images); "
            "give a denoiser, e.g. one from smoothcert train-denoiser, as the denoiser"
        )
    if classifier.get("kind") == DENOISER:
        raise ModelError(
            f"model {classifier['id']} is a denoiser; the classifier must output class scores"
        )
    if list(denoiser["input_shape"]) != list(classifier["input_shape"]):
        raise ModelError(
            f"the denoiser {denoiser['id']} takes and returns images of shape {denoiser['input_shape']}, "
            f"the classifier {classifier['id']} takes {classifier['input_shape']}; they must agree"
        )
