"""`target_radius` through the API: ordinary and dataset jobs, rows, TSV, totals, bad requests."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tests.support.stack import wait_job


@pytest.fixture(scope="module")
def digits(demo_paths):
    return np.load(demo_paths["test_x"]), np.load(demo_paths["test_y"])


def submit(client, **body) -> str:
    resp = client.post("/v1/certify", json=body)
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]


def test_target_radius_job_answers_certified_at_r_with_few_samples(client, demo_model, digits):
    x, y = digits
    job = wait_job(
        client,
        submit(
            client,
            model_id=demo_model["id"],
            inputs=x[:10].tolist(),
            labels=y[:10].tolist(),
            sigma=0.25,
            target_radius=0.1,
            n=100_000,
            seed=3,
        ),
        timeout=120,
    )
    assert job["status"] == "succeeded", job["error"]
    rows = job["result"]["results"]
    assert len(rows) == 10 and all("certified_at_r" in r and "samples_used" in r for r in rows)
    # the demo model certifies most test digits at 0.1 (it certifies 83% at 0.25 with n = 10,000)
    assert sum(r["certified_at_r"] for r in rows) >= 7
    assert all(r["radius"] >= 0.1 for r in rows if r["certified_at_r"])
    assert sum(r["samples_used"] for r in rows) < 10 * 100_100 / 40
    assert job["progress"]["done"] == job["progress"]["total"]
    assert 0 <= job["result"]["certified_accuracy_at_r"] <= 1
    assert job["params"]["target_radius"] == 0.1
    tsv = client.get(f"/v1/jobs/{job['id']}/results.tsv").text
    assert tsv.splitlines()[0].endswith("certified_at_r\tsamples_used\ttarget_radius")


def test_dataset_job_reports_samples_against_fixed_n(client, admin, demo_model, digits):
    x, y = digits
    buffer = io.BytesIO()
    np.savez(buffer, x=x[:40], y=y[:40])
    resp = client.post(
        "/v1/datasets", files={"file": ("d.npz", buffer.getvalue())}, data={"name": "forty"}
    )
    assert resp.status_code == 201, resp.text
    job = wait_job(
        client,
        submit(
            client,
            model_id=demo_model["id"],
            dataset_id=resp.json()["id"],
            sigma=0.25,
            target_radius=0.1,
            n=100_000,
            seed=5,
        ),
        timeout=180,
    )
    assert job["status"] == "succeeded", job["error"]
    totals = job["result"]["totals"]
    assert totals["samples_fixed_n"] == 40 * 100_100
    assert totals["samples_used"] * 40 < totals["samples_fixed_n"]
    assert "certified_accuracy_at_r" in job["result"]


@pytest.mark.parametrize(
    "extra,phrase",
    [
        ({"target_radius": -0.1}, "greater than or equal"),
        ({"target_radius": 0.1, "mode": "predict"}, "target_radius goes with"),
        ({"target_radius": 0.1, "bound": "top2"}, "target_radius goes with"),
    ],
)
def test_bad_target_radius_requests(client, demo_model, digits, extra, phrase):
    resp = client.post(
        "/v1/certify",
        json={
            "model_id": demo_model["id"],
            "inputs": digits[0][:1].tolist(),
            "sigma": 0.25,
            **extra,
        },
    )
    assert resp.status_code == 422 and phrase in resp.text
