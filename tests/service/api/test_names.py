"""Names people give (models, datasets, training runs, pipelines), and what a model file says of
itself, on the real stack: a name with a control or format character (NUL, CR/LF, U+202E
RIGHT-TO-LEFT OVERRIDE, U+2029) is refused with 422, and so is an uploaded model whose metadata is
too large for every listing to carry."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest

from smoothcert.models.metadata import (
    MAX_EXTRA_JSON_BYTES,
    MAX_NAME_CHARS,
    METADATA_KEY,
    check_name,
)
from tests.support.stack import upload_dataset, upload_model

HOSTILE = [
    "nul\x00name",
    "two\r\nlines",
    "report\u202eFDP.exe",
    "para\u2029graph",
    "zero\u200bwidth",
]


def npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((1, 1, 8, 8), dtype=np.uint8), y=np.zeros(1, dtype=np.int64))
    return buf.getvalue()


def refused(resp, *phrases: str) -> None:
    assert resp.status_code == 422, resp.text
    text = resp.text
    assert all(p in text for p in phrases), text


def test_the_shared_validator_names_the_character():
    with pytest.raises(ValueError, match=r"U\+202E \(RIGHT-TO-LEFT OVERRIDE\) at position 6"):
        check_name("report\u202eFDP.exe")
    assert check_name("résumé – ünïcode ok") == "résumé – ünïcode ok"


@pytest.mark.parametrize("name", HOSTILE)
def test_every_name_field_refuses_control_characters(client, admin, demo_paths, demo_model, name):
    refused(
        client.post("/v1/datasets", files={"file": ("d.npz", npz())}, data={"name": name}),
        "control or formatting characters",
    )
    refused(
        upload_model(admin, "d.onnx", demo_paths["onnx"].read_bytes(), name=name),
        "model refused: name holds U+",
    )
    refused(
        admin.post(
            "/v1/models/pipelines",
            json={"denoiser": demo_model["id"], "classifier": demo_model["id"], "name": name},
        ),
        "control or formatting characters",
    )
    refused(
        admin.post("/v1/train", json={"dataset": "digits", "epochs": 1, "name": name}),
        "control or formatting characters",
    )
    refused(
        admin.post(
            "/v1/train/denoiser",
            json={"dataset": "digits", "epochs": 1, "name": name},
        ),
        "control or formatting characters",
    )


def test_a_file_name_with_a_control_character_is_refused(client, admin, demo_paths):
    refused(upload_dataset(client, npz(), "x\u202egpj.npz"), "the file name holds U+202E")
    refused(
        upload_model(admin, "x\u202exnno.onnx", demo_paths["onnx"].read_bytes()),
        "model refused: the file name holds U+202E",
    )


def test_a_name_longer_than_the_cap_is_refused(client, admin, demo_paths):
    long = "n" * (MAX_NAME_CHARS + 1)
    refused(client.post("/v1/datasets", files={"file": ("d.npz", npz())}, data={"name": long}))
    refused(
        upload_model(admin, "d.onnx", demo_paths["onnx"].read_bytes(), name=long),
        f"at most {MAX_NAME_CHARS}",
    )


def described_onnx(path, **fields) -> bytes:
    """The demo ONNX with ``fields`` merged into the JSON it carries about itself."""
    model = onnx.load(str(path))
    [entry] = [p for p in model.metadata_props if p.key == METADATA_KEY]
    entry.value = json.dumps({**json.loads(entry.value), **fields})
    return model.SerializeToString()


def test_a_model_file_with_too_large_metadata_is_refused(admin, demo_paths, data_dir):
    models = data_dir / "models"
    before = sorted(p.name for p in models.iterdir()) if models.is_dir() else []
    huge = described_onnx(demo_paths["onnx"], extra={"notes": "x" * MAX_EXTRA_JSON_BYTES})
    refused(
        upload_model(admin, "notes.onnx", huge),
        "model refused",
        f"extra (without its schedule) is {MAX_EXTRA_JSON_BYTES + 12} bytes",
    )
    assert (sorted(p.name for p in models.iterdir()) if models.is_dir() else []) == before
    fits = described_onnx(demo_paths["onnx"], extra={"notes": "x" * (MAX_EXTRA_JSON_BYTES - 12)})
    resp = upload_model(admin, "fits.onnx", fits)
    assert resp.status_code == 201, resp.text
    assert len(resp.json()["extra"]["notes"]) == MAX_EXTRA_JSON_BYTES - 12
    assert admin.delete(f"/v1/models/{resp.json()['id']}").status_code == 204
