"""``POST /v1/certify?wait=S`` on the real stack: a small PREDICT answers 200 with its result
inline, a long job the usual 202 after about S seconds, S outside (0, 30] is a 422, and an
Idempotency-Key replay answers what the first request answered; the client's ``wait_s`` and the
CLI's ``submit --wait-s``."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from smoothcert.service.api.routes.certify import MAX_WAIT_S
from smoothcert.service.cli.main import main
from smoothcert.service.client.service_client import ServiceClient, finished
from tests.support.stack import USER_KEY, wait_job


@pytest.fixture(scope="module")
def digits(demo_paths):
    return np.load(demo_paths["test_x"]), np.load(demo_paths["test_y"])


@pytest.fixture(scope="module")
def warm_model(client, demo_model, digits) -> dict:
    """The demo model after one job, so that the worker has chosen its runtime (the first job of a
    model times them) and a small job takes well under a second."""
    x, _ = digits
    body = {"model_id": demo_model["id"], "inputs": x[:1].tolist(), "sigma": 0.25}
    resp = client.post("/v1/certify", json={**body, "mode": "predict", "n": 100})
    assert resp.status_code == 202, resp.text
    assert wait_job(client, resp.json()["job_id"], timeout=120)["status"] == "succeeded"
    return demo_model


def predict(model: dict, x: np.ndarray, **extra) -> dict:
    return {
        "model_id": model["id"],
        "inputs": x.tolist(),
        "sigma": 0.25,
        "mode": "predict",
        "n": 200,
        "seed": 5,
        **extra,
    }


def test_a_small_predict_answers_200_with_its_result_inline(client, warm_model, digits):
    x, y = digits
    resp = client.post("/v1/certify", params={"wait": 20}, json=predict(warm_model, x[:3]))
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["kind"] == "predict" and job["status"] == "succeeded"
    rows = job["result"]["results"]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert sum(r["prediction"] == label for r, label in zip(rows, y[:3])) >= 2
    # the very record GET /v1/jobs/{id} shows
    assert client.get(f"/v1/jobs/{job['id']}").json() == job


def test_a_long_job_answers_202_after_about_the_wait(client, warm_model, digits):
    x, _ = digits
    body = {"model_id": warm_model["id"], "inputs": x[:8].tolist(), "sigma": 0.25}
    started = time.monotonic()
    resp = client.post("/v1/certify", params={"wait": 1.5}, json={**body, "n": 1_000_000})
    took = time.monotonic() - started
    assert resp.status_code == 202, resp.text
    accepted = resp.json()
    try:
        assert set(accepted) == {"job_id", "status", "location"}
        assert 1.5 <= took < 6, took
        assert client.get(accepted["location"]).json()["status"] in ("queued", "running")
    finally:
        client.delete(accepted["location"])
        assert wait_job(client, accepted["job_id"], timeout=120)["status"] == "canceled"


@pytest.mark.parametrize("wait", ["0", "-1", str(MAX_WAIT_S + 0.5), "300", "nan", "soon"])
def test_a_wait_outside_its_range_is_a_422_and_queues_nothing(client, warm_model, digits, wait):
    x, _ = digits
    before = client.get("/v1/jobs", params={"limit": 1}).json()["jobs"]
    resp = client.post("/v1/certify", params={"wait": wait}, json=predict(warm_model, x[:1]))
    assert resp.status_code == 422, resp.text
    assert any(item["loc"] == ["query", "wait"] for item in resp.json()["detail"])
    assert client.get("/v1/jobs", params={"limit": 1}).json()["jobs"] == before


def test_an_idempotency_replay_answers_what_the_first_answered(client, warm_model, digits):
    x, _ = digits
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = predict(warm_model, x[:2])
    first = client.post("/v1/certify", params={"wait": 20}, json=body, headers=key)
    assert first.status_code == 200, first.text
    # a repeat without wait still answers the first's 200 and record, and queues no second job
    again = client.post("/v1/certify", json=body, headers=key)
    assert again.status_code == 200 and again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]

    # and a first answer of 202 is replayed as 202
    key = {"Idempotency-Key": str(uuid.uuid4())}
    long = {"model_id": warm_model["id"], "inputs": x[:8].tolist(), "sigma": 0.25, "n": 1_000_000}
    first = client.post("/v1/certify", params={"wait": 0.2}, json=long, headers=key)
    assert first.status_code == 202, first.text
    try:
        again = client.post("/v1/certify", params={"wait": 0.2}, json=long, headers=key)
        assert again.status_code == 202 and again.json() == first.json()
    finally:
        client.delete(first.json()["location"])
        wait_job(client, first.json()["job_id"], timeout=120)


def test_the_client_and_the_cli_take_a_wait(
    api_url, warm_model, digits, tmp_path, capsys, monkeypatch
):
    x, y = digits
    np.save(tmp_path / "x.npy", x[:4])
    with ServiceClient(api_url, USER_KEY) as service:
        record = service.submit(
            warm_model["id"], [tmp_path / "x.npy"], 0.25, mode="predict", n=200, wait_s=20
        )
    assert finished(record) and record["status"] == "succeeded"
    assert len(record["result"]["results"]) == 4

    monkeypatch.setenv("SMOOTHCERT_API_KEY", USER_KEY)
    argv = ["submit", warm_model["id"], "--url", api_url, "--inputs", str(tmp_path / "x.npy")]
    code = main([*argv, "--sigma", "0.25", "--mode", "predict", "--n", "200", "--wait-s", "20"])
    out, err = capsys.readouterr()
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.startswith("idx") and len(rows) == 4  # the TSV, with no polling
    assert "predicted" in err
    assert main([*argv, "--sigma", "0.25", "--wait-s", "31"]) == 2
    assert "--wait-s" in capsys.readouterr().err
