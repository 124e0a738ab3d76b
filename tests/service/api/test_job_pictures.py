"""Votes in the rows, RFC 3339 times, the noisy copies as PNG and the certified-accuracy curve as SVG."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from datetime import datetime

import numpy as np
import pytest
import redis
from PIL import Image

from smoothcert.service.core.jobs import JobStore, new_job_id
from tests.support.stack import upload_dataset, wait_job

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def digits(demo_paths):
    return np.load(demo_paths["test_x"]), np.load(demo_paths["test_y"])


def run(client, **body) -> dict:
    resp = client.post("/v1/certify", json=body)
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"])
    assert job["status"] == "succeeded", job["error"]
    return job


@pytest.fixture(scope="module")
def labelled(client, demo_model, digits) -> dict:
    """A certify job of 18 digits with labels: two more rows than the worker keeps copies of."""
    x, y = digits
    return run(
        client,
        model_id=demo_model["id"],
        inputs=x[:18].tolist(),
        labels=y[:18].tolist(),
        sigma=0.25,
        n0=20,
        n=200,
        seed=31,
        batch_size=64,
    )


def test_votes_sum_to_n_and_hold_n_a(client, demo_model, digits, labelled):
    for row in labelled["result"]["results"]:
        assert sum(row["votes"].values()) == 200 and all(v > 0 for v in row["votes"].values())
        assert row["n_a"] == (
            row["votes"][str(row["prediction"])] if not row["abstained"] else row["n_a"]
        )
        assert row["n_a"] in list(row["votes"].values()) + [0]
    predicted = run(
        client,
        model_id=demo_model["id"],
        inputs=digits[0][:3].tolist(),
        sigma=0.25,
        n=200,
        seed=3,
        mode="predict",
    )
    for row in predicted["result"]["results"]:
        counts = sorted(row["votes"].values(), reverse=True) + [0]
        assert sum(counts) == 200 and counts[:2] == [row["n_a"], row["n_b"]]


def test_rows_are_the_engines_for_the_same_seed_although_copies_were_kept(
    labelled, demo_paths, digits
):
    from smoothcert.models.loaders import load_model
    from smoothcert.worker.smoothing import RunOptions, certify

    direct = certify(
        load_model(demo_paths["safetensors"], device="cpu"),
        digits[0][:18],
        0.25,
        n0=20,
        n=200,
        options=RunOptions(batch_size=64, seed=31),
    ).to_dict()["results"]
    served = labelled["result"]["results"]
    drop = ("elapsed_s", "label")
    assert [{k: v for k, v in r.items() if k not in drop} for r in served] == [
        {k: v for k, v in r.items() if k not in drop} for r in direct
    ]


def test_times_are_rfc3339_utc_with_milliseconds_beside_the_numbers(labelled, client):
    for name in ("created", "started", "finished"):
        text = labelled[f"{name}_time"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text), text
        assert datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() == pytest.approx(
            labelled[f"{name}_at"], abs=0.0006
        )
    assert (
        client.get(f"/v1/jobs/{labelled['id']}").json()["created_time"] == labelled["created_time"]
    )


def test_samples_png_shows_eight_copies_of_each_of_the_first_sixteen_rows(
    client, labelled, redis_url, data_dir
):
    job_id = labelled["id"]
    for row in (0, 15):
        resp = client.get(f"/v1/jobs/{job_id}/samples.png", params={"row": row})
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(resp.content))
        # 8 copies of an 8x8 digit, each upscaled 8 times, 2 px apart: 8*64 + 7*2 wide, 64 high.
        assert image.size == (526, 64) and image.mode == "L"
        pixels = np.asarray(image)
        assert len(np.unique(pixels[:, :64])) > 10  # noise, not a flat square
    assert not np.array_equal(
        np.asarray(Image.open(io.BytesIO(client.get(f"/v1/jobs/{job_id}/samples.png").content)))[
            :, :64
        ],
        np.asarray(
            Image.open(
                io.BytesIO(client.get(f"/v1/jobs/{job_id}/samples.png", params={"row": 1}).content)
            )
        )[:, :64],
    )
    for row in (16, 17, 500):
        resp = client.get(f"/v1/jobs/{job_id}/samples.png", params={"row": row})
        assert resp.status_code == 404 and "first rows" in resp.json()["detail"]
    assert client.get(f"/v1/jobs/{job_id}/samples.png", params={"row": -1}).status_code == 422
    # Kept on the data volume, one file per row, nothing of them in Redis.
    kept = data_dir / "results" / job_id / "samples"
    assert sorted(int(p.stem) for p in kept.iterdir()) == list(range(16))
    r = redis.Redis.from_url(redis_url)
    assert not list(r.scan_iter(match=JobStore.key(job_id) + ":*"))


def test_samples_png_is_409_while_queued_and_404_for_unknown_jobs(client, redis_url):
    store = JobStore(redis.Redis.from_url(redis_url))
    job_id = new_job_id()
    store.create(
        job_id, "certify", {"num_inputs": 1}
    )  # a record no message was sent for: it stays queued
    resp = client.get(f"/v1/jobs/{job_id}/samples.png")
    assert resp.status_code == 409 and "queued" in resp.json()["detail"]
    store.request_cancel(job_id)
    assert client.get(f"/v1/jobs/{new_job_id()}/samples.png").status_code == 404


def test_curve_svg_has_axis_labels_and_the_radius_cap(client, labelled):
    resp = client.get(f"/v1/jobs/{labelled['id']}/curve.svg")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("image/svg+xml")
    svg = ET.fromstring(resp.content)
    texts = [t.text or "" for t in svg.iter(f"{SVG}text")]
    assert any(t.startswith("radius (") for t in texts) and "certified accuracy" in texts
    cap = labelled["result"]["results"][0]["radius_cap"]
    assert f"radius cap {cap:.4g}" in texts
    assert [e for e in svg.iter(f"{SVG}line") if e.get("class") == "radius-cap"]
    path = next(e for e in svg.iter(f"{SVG}path") if e.get("class") == "curve")
    assert path.get("d").startswith("M")


def test_curve_svg_is_409_without_labels_or_radii(client, demo_model, digits):
    x = digits[0][:2].tolist()
    unlabelled = run(client, model_id=demo_model["id"], inputs=x, sigma=0.25, n0=10, n=100, seed=4)
    resp = client.get(f"/v1/jobs/{unlabelled['id']}/curve.svg")
    assert resp.status_code == 409 and "no labels" in resp.json()["detail"]
    predicted = run(
        client,
        model_id=demo_model["id"],
        inputs=x,
        labels=[0, 1],
        sigma=0.25,
        n=100,
        mode="predict",
    )
    resp = client.get(f"/v1/jobs/{predicted['id']}/curve.svg")
    assert resp.status_code == 409 and "certify job" in resp.json()["detail"]


def test_dataset_job_rows_have_votes_and_copies_from_its_first_row(client, demo_model, digits):
    x, y = digits
    buf = io.BytesIO()
    np.savez(buf, x=x[:4], y=y[:4])
    dataset = upload_dataset(client, buf.getvalue())
    assert dataset.status_code == 201, dataset.text
    job = run(
        client,
        model_id=demo_model["id"],
        dataset_id=dataset.json()["id"],
        skip=1,
        sigma=0.25,
        n0=10,
        n=100,
        seed=5,
    )
    rows = job["result"]["results"]
    assert [r["index"] for r in rows] == [1, 2, 3]
    assert all(sum(r["votes"].values()) == 100 for r in rows)
    assert client.get(f"/v1/jobs/{job['id']}/samples.png", params={"row": 1}).status_code == 200
    assert client.get(f"/v1/jobs/{job['id']}/samples.png", params={"row": 0}).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}/curve.svg").status_code == 200
