"""Every bad certify request gets a 4xx with a JSON detail that says what was wrong, never a 500."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

GOOD = {"sigma": 0.25, "n0": 10, "n": 100}
IMAGE = np.full((1, 8, 8), 0.5).tolist()


def npy_b64(array) -> str:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return base64.b64encode(buf.getvalue()).decode()


# (what to change in a good request, expected status, a phrase of the message)
BAD = [
    ({"sigma": 0}, 422, "greater than 0"),
    ({"sigma": -1}, 422, "greater than 0"),
    ({"n0": 0}, 422, "greater than or equal to 1"),
    ({"n": 0}, 422, "greater than or equal to 1"),
    ({"alpha": 0}, 422, "greater than 0"),
    ({"alpha": 1}, 422, "less than 1"),
    ({"n": 10**9}, 422, "cap of 2000000"),
    ({"bound": "bonferroni"}, 422, "cohen"),
    ({"mode": "attack"}, 422, "certify"),
    ({"inputs": np.full((3, 8, 8), 0.5).tolist()}, 422, "the model takes [1, 8, 8]"),
    ({"inputs": np.full((2, 1, 4, 4), 0.5).tolist()}, 422, "shape [2, 1, 4, 4]"),
    ({"inputs": [[[0.5, 0.5], [0.5]]]}, 422, "rectangular"),
    ({"inputs": [[["a"] * 8] * 8]}, 422, "rectangular"),
    ({"inputs": np.full((1, 8, 8), 2.0).tolist()}, 422, "[0, 1]"),
    ({"inputs": np.full((1, 8, 8), -0.1).tolist()}, 422, "[0, 1]"),
    ({"inputs": npy_b64(np.full((1, 8, 8), np.nan))}, 422, "NaN"),
    ({"inputs": npy_b64(np.full((1, 8, 8), np.inf))}, 422, "NaN or infinite"),
    ({"inputs": "not base64!"}, 422, "base64"),
    ({"inputs": base64.b64encode(b"hello").decode()}, 422, ".npy"),
    ({"inputs": npy_b64(np.array([{"a": 1}], dtype=object))}, 422, "pickle"),
    ({"inputs": np.full((65, 1, 8, 8), 0.5).tolist()}, 422, "cap of 64"),
    ({"labels": [1, 2]}, 422, "2 labels for 1 inputs"),
    ({"labels": [10]}, 422, "[0, 10)"),
    ({"seed": -1}, 422, "greater than or equal to 0"),
    ({"batch_size": 0}, 422, "greater than or equal to 1"),
    ({"surprise": 1}, 422, "Extra inputs"),
]


@pytest.mark.parametrize("change,code,phrase", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_request_is_refused_with_a_message(client, demo_model, change, code, phrase):
    body = {"model_id": demo_model["id"], "inputs": IMAGE, **GOOD, **change}
    resp = client.post("/v1/certify", json=body)
    assert resp.status_code == code, resp.text
    assert phrase in str(resp.json()["detail"])


def test_missing_fields_are_named(client):
    resp = client.post("/v1/certify", json={"inputs": IMAGE})
    assert resp.status_code == 422
    missing = {tuple(e["loc"])[-1] for e in resp.json()["detail"]}
    assert {"model_id", "sigma"} <= missing


def test_unknown_model_is_404(client):
    resp = client.post("/v1/certify", json={"model_id": "nope", "inputs": IMAGE, **GOOD})
    assert resp.status_code == 404 and "unknown model" in resp.json()["detail"]


def test_malformed_json_is_422(client):
    resp = client.post(
        "/v1/certify", content=b'{"model_id": ', headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 422 and resp.json()["detail"]


def test_oversized_body_is_413(client, demo_model):
    big = np.full((1, 200, 200), 0.123456789).tolist()  # ~ 520 kB of JSON, over the 256 kB test cap
    resp = client.post("/v1/certify", json={"model_id": demo_model["id"], "inputs": big, **GOOD})
    assert resp.status_code == 413 and "limit" in resp.json()["detail"]


def test_validation_errors_do_not_echo_the_inputs(client, demo_model):
    resp = client.post(
        "/v1/certify", json={"model_id": demo_model["id"], "inputs": IMAGE, "sigma": "x"}
    )
    assert resp.status_code == 422 and "0.5" not in resp.text
