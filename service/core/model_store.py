"""ModelStore: uploaded models on disk, one folder per model, torch-free.

Layout under ``root`` (``DATA_DIR/models``)::

    <id>/model.onnx | model.safetensors   the weights, exactly as uploaded
    <id>/meta.json                        the model record (see below)

The record holds ``id``, ``status`` ("pending" until a worker loaded the model and ran one
batch, then "ready"), ``name``, ``format``, ``filename``, ``size_bytes``, ``sha256``,
``created_at`` and the loader's fields (``arch``, ``input_shape``, ``num_classes``,
``class_names``, ``normalization``, ``sigma``). Records are replaced atomically (write then
rename), so readers never see half a file. Pickled checkpoints, and safetensors files whose
header lies about their tensors, are refused before anything is kept: a worker never sees them.
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

from smoothcert.models.metadata import ModelError
from smoothcert.models.safetensors_header import looks_pickled, read_safetensors_header

FORMATS = {".onnx": "onnx", ".safetensors": "safetensors"}
PENDING, READY = "pending", "ready"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class UploadTooLarge(ModelError):
    """The upload exceeds the size cap."""


def detect_format(filename: str, head: bytes) -> str:
    """"onnx" or "safetensors" from the file name and its first (at least 9) bytes; ModelError otherwise."""
    if looks_pickled(head):
        raise ModelError(f"{filename} is a pickled PyTorch checkpoint; smoothcert never unpickles model files "
                         "(that runs the uploader's code); convert it to safetensors or export it to ONNX")
    suffix = Path(filename or "").suffix.lower()
    if suffix not in FORMATS:
        raise ModelError(f"unsupported model file {filename!r}: upload a .onnx file or a .safetensors file "
                         "with an allow-listed arch")
    return FORMATS[suffix]


class ModelStore:
    """Models under ``root``; every method is safe to call from the API and the worker."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, model_id: str) -> Path:
        if not _ID.match(model_id or ""):
            raise KeyError(model_id)
        return self.root / model_id

    def weights_path(self, model_id: str) -> Path:
        """The stored weights file of ``model_id``; KeyError when there is no such model."""
        meta = self.get(model_id, include_pending=True)
        if meta is None:
            raise KeyError(model_id)
        return self._dir(model_id) / f"model.{meta['format']}"

    def add(self, src: BinaryIO, filename: str, fields: dict[str, Any], *,
            max_bytes: int | None = None) -> dict[str, Any]:
        """Copy an upload into a new pending model and return its record.

        ``fields`` are the user's metadata (name, arch, input_shape, ...), stored as given for the
        worker's loader to check. Raises ModelError for a pickle, an unknown format or a lying
        safetensors header, and UploadTooLarge past ``max_bytes``; nothing is left on disk then.
        """
        head = src.read(9)
        fmt = detect_format(filename, head)
        model_id = uuid.uuid4().hex[:16]
        folder = self._dir(model_id)
        folder.mkdir(parents=True)
        digest, size = hashlib.sha256(head), len(head)
        weights = folder / f"model.{fmt}"
        try:
            with open(weights, "wb") as out:
                out.write(head)
                while block := src.read(1 << 20):
                    size += len(block)
                    if max_bytes is not None and size > max_bytes:
                        raise UploadTooLarge(f"the model file exceeds the {max_bytes}-byte upload limit")
                    digest.update(block)
                    out.write(block)
            if fmt == "safetensors":
                # Plain Python that reads the header only: offsets beyond the file, overlapping
                # tensors or a huge header length are refused here, without a worker.
                read_safetensors_header(weights)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        meta = {**{k: v for k, v in fields.items() if v is not None},
                "id": model_id, "status": PENDING, "format": fmt, "filename": Path(filename).name,
                "size_bytes": size, "sha256": digest.hexdigest(), "created_at": round(time.time(), 3)}
        meta.setdefault("name", Path(filename).stem)
        self._write(model_id, meta)
        return meta

    def get(self, model_id: str, *, include_pending: bool = False) -> dict[str, Any] | None:
        """The record, or None when absent (or still pending, unless ``include_pending``)."""
        try:
            text = (self._dir(model_id) / "meta.json").read_text()
        except (KeyError, OSError):
            return None
        meta = json.loads(text)
        return meta if include_pending or meta.get("status") == READY else None

    def list(self) -> list[dict[str, Any]]:
        """Ready models, oldest first."""
        if not self.root.is_dir():
            return []
        records = (self.get(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted((r for r in records if r), key=lambda r: r.get("created_at", 0))

    def update(self, model_id: str, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the record (e.g. status=READY and the loader's findings)."""
        meta = self.get(model_id, include_pending=True)
        if meta is None:
            raise KeyError(model_id)
        meta.update(fields)
        self._write(model_id, meta)
        return meta

    def delete(self, model_id: str) -> bool:
        """Remove the model's folder; False when there was none."""
        try:
            folder = self._dir(model_id)
        except KeyError:
            return False
        if not folder.is_dir():
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return True

    def _write(self, model_id: str, meta: dict[str, Any]) -> None:
        path = self._dir(model_id) / "meta.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp, path)
