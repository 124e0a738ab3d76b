"""Model upload (checked by a worker before 201), listing, deletion, and refused files."""

from __future__ import annotations

import json
import pickle

import pytest

from smoothcert.service.core.jobs import rfc3339
from tests.support.stack import upload_model


def test_safetensors_upload_is_checked_and_listed(client, demo_model, demo_paths):
    assert demo_model["format"] == "safetensors" and demo_model["status"] == "ready"
    assert demo_model["input_shape"] == [1, 8, 8] and demo_model["num_classes"] == 10
    assert demo_model["arch"] == "digits_cnn" and len(demo_model["sha256"]) == 64
    assert client.get(f"/v1/models/{demo_model['id']}").json()["sha256"] == demo_model["sha256"]
    assert demo_model["id"] in [m["id"] for m in client.get("/v1/models").json()]
    assert demo_model["created_time"] == rfc3339(demo_model["created_at"])


def test_onnx_upload_reads_shapes_from_the_file_and_can_be_deleted(admin, demo_paths):
    resp = upload_model(
        admin,
        "digits.onnx",
        demo_paths["onnx"].read_bytes(),
        name="digits-onnx",
        normalization=json.dumps({"mean": [0.3], "std": [0.4]}),
    )
    assert resp.status_code == 201, resp.text
    model = resp.json()
    assert resp.headers["Location"] == f"/v1/models/{model['id']}"
    assert (model["format"], model["input_shape"], model["num_classes"]) == ("onnx", [1, 8, 8], 10)
    assert model["name"] == "digits-onnx" and model["normalization"] == {
        "mean": [0.3],
        "std": [0.4],
    }
    assert admin.delete(f"/v1/models/{model['id']}").status_code == 204
    assert admin.get(f"/v1/models/{model['id']}").status_code == 404
    assert admin.delete(f"/v1/models/{model['id']}").status_code == 404


@pytest.mark.parametrize(
    "name,content,fields,phrase",
    [
        ("model.pt", pickle.dumps({"weights": [1, 2]}), {}, "never unpickles"),
        ("model.safetensors", b"PK\x03\x04" + b"\0" * 100, {}, "never unpickles"),
        ("model.h5", b"HDF5", {}, "upload a .onnx file"),
        ("model.onnx", b"\x08garbage", {}, "model refused"),
        ("model.safetensors", b"\x10\0\0\0\0\0\0\0{not json}", {}, "model refused"),
    ],
)
def test_bad_files_are_refused_with_a_message(admin, name, content, fields, phrase):
    resp = upload_model(admin, name, content, **fields)
    assert resp.status_code == 422, resp.text
    assert phrase in resp.json()["detail"]


def test_class_count_mismatch_is_refused(admin, demo_paths):
    resp = upload_model(
        admin, "d.safetensors", demo_paths["safetensors"].read_bytes(), num_classes="7"
    )
    assert resp.status_code == 422 and "model refused" in resp.json()["detail"]


@pytest.mark.parametrize(
    "fields,phrase",
    [
        ({"input_shape": "[1, 8]"}, "input_shape"),
        ({"input_shape": "oops"}, "input_shape"),
        ({"class_names": "[1, 2]"}, "class_names"),
        ({"normalization": '{"std": [1]}'}, "normalization"),
        ({"num_classes": "0"}, "num_classes"),
    ],
)
def test_bad_metadata_fields_are_refused(admin, demo_paths, fields, phrase):
    resp = upload_model(admin, "d.onnx", demo_paths["onnx"].read_bytes(), **fields)
    assert resp.status_code == 422 and phrase in resp.json()["detail"]


def test_refused_uploads_leave_nothing_behind(admin, data_dir):
    before = sorted(p.name for p in (data_dir / "models").iterdir())
    upload_model(admin, "model.onnx", b"\x08garbage")
    assert sorted(p.name for p in (data_dir / "models").iterdir()) == before


def test_oversized_upload_is_413(admin):
    resp = upload_model(admin, "big.onnx", b"\x08" + b"\0" * (4 << 20))
    assert resp.status_code == 413


def test_unknown_model_is_404(client):
    assert client.get("/v1/models/0123456789abcdef").status_code == 404
    assert client.get("/v1/models/..").status_code == 404
