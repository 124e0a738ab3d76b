"""ModelStore.add: what it refuses before anything is kept, and that a refusal leaves no trace."""

from __future__ import annotations

import io
import json
import pickle
import struct

import pytest

from smoothcert.models.metadata import ModelError
from smoothcert.service.core.model_store import PENDING, ModelStore, UploadTooLarge


def safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_a_good_safetensors_file_is_kept_pending(tmp_path, demo_paths):
    store = ModelStore(tmp_path / "models")
    with open(demo_paths["safetensors"], "rb") as f:
        meta = store.add(f, "dir/digits.safetensors", {"arch": "digits_cnn"})
    assert (
        meta["status"] == PENDING
        and meta["name"] == "digits"
        and meta["filename"] == "digits.safetensors"
    )
    assert store.weights_path(meta["id"]).read_bytes() == demo_paths["safetensors"].read_bytes()


@pytest.mark.parametrize(
    "filename,content,error,phrase",
    [
        (
            "m.safetensors",
            safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
            ModelError,
            "header describes 16 bytes of tensor data, the file holds 8",
        ),
        (
            "m.safetensors",
            struct.pack("<Q", 2**62) + b"{}",
            ModelError,
            "header length 4611686018427387904",
        ),
        ("m.safetensors", pickle.dumps({"w": 1}, protocol=0), ModelError, "header length"),
        ("m.pt", pickle.dumps({"w": 1}), ModelError, "never unpickles"),
        ("m.onnx", b"\x08" + bytes(4096), UploadTooLarge, "1024-byte upload limit"),
    ],
)
def test_refusals_leave_nothing_behind(tmp_path, filename, content, error, phrase):
    store = ModelStore(tmp_path / "models")
    with pytest.raises(error, match=phrase):
        store.add(io.BytesIO(content), filename, {}, max_bytes=1024)
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []
