"""Certify and predict through the queue: submit, poll, results, TSV, same answer as the engine."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from tests.support.stack import wait_job


@pytest.fixture(scope="module")
def digits(demo_paths):
    return np.load(demo_paths["test_x"]), np.load(demo_paths["test_y"])


def submit(client, **body):
    resp = client.post("/v1/certify", json=body)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    assert resp.headers["Location"] == f"/v1/jobs/{job_id}"
    return job_id


def test_certify_succeeds_with_one_result_per_input_and_full_progress(client, demo_model, digits):
    x, y = digits
    job_id = submit(
        client,
        model_id=demo_model["id"],
        inputs=x[:3].tolist(),
        labels=y[:3].tolist(),
        sigma=0.25,
        n0=50,
        n=500,
        seed=7,
    )
    job = wait_job(client, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["kind"] == "certify"
    assert job["progress"] == {"done": 3 * 550, "total": 3 * 550, "unit": "samples"}
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    rows = job["result"]["results"]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["label"] for r in rows] == y[:3].tolist()
    # The demo model classifies clean test digits confidently at sigma = 0.25.
    assert any(r["radius"] > 0 and r["prediction"] == r["label"] for r in rows)
    assert all(r["n"] == 500 and r["radius"] <= r["radius_cap"] for r in rows)
    provenance = job["result"]["provenance"]
    assert provenance["seed"] == 7 and provenance["model_sha256"] == demo_model["sha256"]
    curve = job["result"]["certified_accuracy"]
    assert curve[0]["radius"] == 0 and 0 < curve[0]["accuracy"] <= 1
    assert all(a["accuracy"] >= b["accuracy"] for a, b in zip(curve, curve[1:]))


def test_queue_gives_the_engine_answer_for_the_same_seed(client, demo_model, demo_paths, digits):
    from smoothcert.models.loaders import load_model
    from smoothcert.worker.smoothing import RunOptions, certify

    x = digits[0][:2]
    job = wait_job(
        client,
        submit(
            client,
            model_id=demo_model["id"],
            inputs=x.tolist(),
            sigma=0.25,
            n0=20,
            n=300,
            seed=123,
            batch_size=64,
            runtime="torch",
        ),
    )
    direct = certify(
        load_model(demo_paths["safetensors"], device="cpu"),
        x,
        0.25,
        n0=20,
        n=300,
        options=RunOptions(batch_size=64, seed=123),
    ).to_dict()["results"]
    assert [(r["prediction"], r["n_a"], r["radius"]) for r in job["result"]["results"]] == [
        (r["prediction"], r["n_a"], r["radius"]) for r in direct
    ]


def test_seed_is_drawn_and_recorded_when_absent(client, demo_model, digits):
    job = wait_job(
        client,
        submit(
            client,
            model_id=demo_model["id"],
            inputs=digits[0][0].tolist(),
            sigma=0.25,
            n0=10,
            n=100,
        ),
    )
    assert isinstance(job["params"]["seed"], int)
    assert job["result"]["provenance"]["seed"] == job["params"]["seed"]


def test_base64_npy_inputs_and_top2_bound(client, demo_model, digits):
    buf = io.BytesIO()
    np.save(buf, digits[0][:2])
    job = wait_job(
        client,
        submit(
            client,
            model_id=demo_model["id"],
            inputs=base64.b64encode(buf.getvalue()).decode(),
            sigma=0.25,
            n0=20,
            n=300,
            bound="top2",
            seed=1,
        ),
    )
    assert job["status"] == "succeeded", job["error"]
    assert len(job["result"]["results"]) == 2 and "p_b_upper" in job["result"]["results"][0]


def test_predict_mode(client, demo_model, digits):
    x, y = digits
    job = wait_job(
        client,
        submit(
            client,
            model_id=demo_model["id"],
            inputs=x[:4].tolist(),
            labels=y[:4].tolist(),
            sigma=0.25,
            n=200,
            mode="predict",
            seed=3,
        ),
    )
    assert job["status"] == "succeeded" and job["kind"] == "predict"
    assert job["progress"]["done"] == job["progress"]["total"] == 4 * 200
    rows = job["result"]["results"]
    assert len(rows) == 4 and all("p_value" in r for r in rows)
    assert 0 <= job["result"]["accuracy"] <= 1


def test_results_tsv_has_cohen_columns_first(client, demo_model, digits):
    x, y = digits
    job_id = submit(
        client,
        model_id=demo_model["id"],
        inputs=x[:2].tolist(),
        labels=y[:2].tolist(),
        sigma=0.25,
        n0=10,
        n=200,
        seed=5,
    )
    wait_job(client, job_id)
    resp = client.get(f"/v1/jobs/{job_id}/results.tsv")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith(
        "text/tab-separated-values"
    )
    lines = resp.text.splitlines()
    assert lines[0].split("\t")[:6] == ["idx", "label", "predict", "radius", "correct", "time"]
    assert len(lines) == 3 and lines[1].split("\t")[1] == str(y[0])


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((image[0] * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_multipart_png_images_with_labels(client, demo_model, digits):
    x, y = digits
    files = [("inputs", (f"digit{i}.png", png(x[i]), "image/png")) for i in range(3)]
    form = {
        "model_id": demo_model["id"],
        "sigma": "0.25",
        "n0": "20",
        "n": "300",
        "seed": "9",
        "labels": json.dumps(y[:3].tolist()),
    }
    resp = client.post("/v1/certify", files=files, data=form)
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"])
    assert job["status"] == "succeeded" and len(job["result"]["results"]) == 3
    assert job["params"]["seed"] == 9 and "certified_accuracy" in job["result"]


def test_multipart_npy_file(client, demo_model, digits):
    buf = io.BytesIO()
    np.save(buf, digits[0][:2])
    resp = client.post(
        "/v1/certify",
        files=[("inputs", ("x.npy", buf.getvalue()))],
        data={
            "model_id": demo_model["id"],
            "sigma": "0.25",
            "n0": "10",
            "n": "100",
            "mode": "predict",
        },
    )
    assert resp.status_code == 202, resp.text
    assert len(wait_job(client, resp.json()["job_id"])["result"]["results"]) == 2


@pytest.mark.parametrize(
    "files,data,phrase",
    [
        ([("inputs", ("a.png", b"not an image"))], {}, "not a readable PNG or JPEG"),
        ([("inputs", ("a.txt", b"1 2 3"))], {}, "PNG/JPEG images or a single .npy"),
        ([], {}, "no 'inputs' files"),
        ([("inputs", ("x.npy", b"junk"))], {}, ".npy"),
        ([("picture", ("a.png", b"x"))], {}, "unexpected file field"),
        (None, {"labels": "1,2"}, "labels must be a JSON list"),
        (None, {"sigma": "-1"}, "greater than 0"),
    ],
)
def test_bad_multipart_requests(client, demo_model, digits, files, data, phrase):
    files = files if files is not None else [("inputs", ("d.png", png(digits[0][0])))]
    body = {"model_id": demo_model["id"], "sigma": "0.25", "n": "100", **data}
    # httpx sends multipart only when there is a file part; a plain part forces it without one.
    resp = client.post("/v1/certify", files=files or {"note": (None, "")}, data=body)
    assert resp.status_code == 422, resp.text
    assert phrase in str(resp.json()["detail"])
