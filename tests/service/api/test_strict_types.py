"""Request fields typed strictly, against the real API: a number is a number, a boolean is not an
integer, labels are integers and pixels numbers, in JSON bodies and in multipart form fields
alike; each refusal is a 422 that names the field."""

from __future__ import annotations

import json

import pytest

from tests.support.images import grey8
from tests.support.stack import wait_job

IMAGE = [[[0.5] * 8] * 8]
GOOD = {"sigma": 0.25, "n0": 10, "n": 100, "seed": 0}


def field_errors(resp) -> dict[tuple, str]:
    """The 422's errors as {location without "body": message}."""
    assert resp.status_code == 422, resp.text
    return {tuple(e["loc"][1:]): e["msg"] for e in resp.json()["detail"]}


CERTIFY_JSON = [
    ({"n": "1000"}, ("n",), "valid integer"),
    ({"n0": "10"}, ("n0",), "valid integer"),
    ({"seed": True}, ("seed",), "valid integer"),
    ({"batch_size": False}, ("batch_size",), "valid integer"),
    ({"n": 1000.5}, ("n",), "valid integer"),
    ({"sigma": "0.25"}, ("sigma",), "valid number"),
    ({"alpha": True}, ("alpha",), "valid number"),
    ({"labels": ["3"]}, ("labels", 0), "valid integer"),
    ({"labels": [True]}, ("labels", 0), "valid integer"),
    ({"labels": [3], "radii": ["0.5"]}, ("radii", 0), "valid number"),
    ({"target_radius": "0.1"}, ("target_radius",), "valid number"),
]


@pytest.mark.parametrize(
    "change,loc,message", CERTIFY_JSON, ids=[json.dumps(c[0]) for c in CERTIFY_JSON]
)
def test_certify_json_fields_of_the_wrong_type_are_refused_by_name(
    client, demo_model, change, loc, message
):
    resp = client.post(
        "/v1/certify", json={"model_id": demo_model["id"], "inputs": IMAGE, **GOOD, **change}
    )
    assert message in field_errors(resp)[loc]


@pytest.mark.parametrize(
    "pixel,what", [("0.5", "the string '0.5'"), (True, "true"), (None, "null")]
)
def test_pixels_must_be_numbers(client, demo_model, pixel, what):
    inputs = json.loads(json.dumps(IMAGE))
    inputs[0][2][5] = pixel
    resp = client.post("/v1/certify", json={"model_id": demo_model["id"], "inputs": inputs, **GOOD})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"] == (
        f"inputs must be a rectangular nested list of numbers: inputs[0][2][5] is "
        f"{what}, not a number"
    )


def test_integers_written_as_whole_floats_are_still_integers(client, demo_model):
    resp = client.post(
        "/v1/certify",
        json={
            "model_id": demo_model["id"],
            "inputs": IMAGE,
            **GOOD,
            "n": 100.0,
            "labels": [3.0],
            "sigma": 1,
        },
    )
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["params"]["n"] == 100 and isinstance(job["params"]["n"], int)
    assert job["result"]["results"][0]["label"] == 3


FORM = [
    ({"seed": "true"}, ("seed",), "valid integer"),
    ({"n": '"1000"'}, ("n",), "valid integer"),
    ({"n": "1_000"}, ("n",), "valid integer"),
    ({"n": "100.5"}, ("n",), "valid integer"),
    ({"sigma": "NaN"}, ("sigma",), "valid number"),
    ({"sigma": "inf"}, ("sigma",), "valid number"),
    ({"sigma": "true"}, ("sigma",), "valid number"),
    ({"alpha": "[0.1]"}, ("alpha",), "valid number"),
    ({"labels": '["3"]'}, ("labels", 0), "valid integer"),
    ({"labels": "[true]"}, ("labels", 0), "valid integer"),
]


@pytest.mark.parametrize("change,loc,message", FORM, ids=[json.dumps(c[0]) for c in FORM])
def test_certify_form_fields_are_read_from_their_text_as_strictly(
    client, demo_model, change, loc, message
):
    form = {"model_id": demo_model["id"], "sigma": "0.25", "n0": "10", "n": "100", **change}
    resp = client.post(
        "/v1/certify", files=[("inputs", ("d.png", grey8(IMAGE[0]), "image/png"))], data=form
    )
    assert message in field_errors(resp)[loc]


def test_form_text_fields_stay_text(client, demo_model):
    form = {
        "model_id": demo_model["id"],
        "sigma": " 0.25 ",
        "n0": "10",
        "n": "100",
        "seed": "4",
        "mode": "predict",
        "labels": "[3]",
        "bound": "cohen",
    }
    resp = client.post(
        "/v1/certify", files=[("inputs", ("d.png", grey8(IMAGE[0]), "image/png"))], data=form
    )
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"])
    assert job["status"] == "succeeded" and job["params"]["n"] == 100 and job["params"]["seed"] == 4


TRAIN = [
    ({"epochs": "5"}, ("epochs",), "valid integer"),
    ({"seed": True}, ("seed",), "valid integer"),
    ({"m": False}, ("m",), "valid integer"),
    ({"sigma": "0.25"}, ("sigma",), "valid number"),
    ({"lr": True}, ("lr",), "valid number"),
]


@pytest.mark.parametrize("change,loc,message", TRAIN, ids=[json.dumps(c[0]) for c in TRAIN])
def test_train_json_fields_of_the_wrong_type_are_refused_by_name(admin, change, loc, message):
    resp = admin.post("/v1/train", json={"dataset": "digits", "epochs": 1, **change})
    assert message in field_errors(resp)[loc]


MODEL_FORM = [
    ({"num_classes": "true"}, ("num_classes",), "valid integer"),
    ({"num_classes": "10.5"}, ("num_classes",), "valid integer"),
    ({"num_classes": '"10"'}, ("num_classes",), "valid integer"),
    ({"sigma": "inf"}, ("sigma",), "valid number"),
    ({"sigma": "1e400"}, ("sigma",), "finite number"),
    ({"sigma": "true"}, ("sigma",), "valid number"),
]


@pytest.mark.parametrize(
    "change,loc,message", MODEL_FORM, ids=[json.dumps(c[0]) for c in MODEL_FORM]
)
def test_model_upload_numeric_fields_are_typed_strictly(admin, demo_paths, change, loc, message):
    with open(demo_paths["safetensors"], "rb") as f:
        resp = admin.post(
            "/v1/models", files={"file": ("m.safetensors", f)}, data={"name": "strict", **change}
        )
    assert message in field_errors(resp)[loc]


@pytest.mark.parametrize(
    "normalization",
    [
        '{"mean": ["0.5"]}',
        '{"mean": [true]}',
        '{"mean": [NaN]}',
        '{"mean": [0.5], "std": [Infinity]}',
        '{"mean": [0.5], "std": "1"}',
    ],
)
def test_model_upload_normalization_must_be_finite_numbers(admin, demo_paths, normalization):
    with open(demo_paths["safetensors"], "rb") as f:
        resp = admin.post(
            "/v1/models",
            files={"file": ("m.safetensors", f)},
            data={"normalization": normalization},
        )
    assert resp.status_code == 422, resp.text
    assert (
        resp.json()["detail"]
        == "model refused: normalization mean and std must be lists of finite numbers"
    )
