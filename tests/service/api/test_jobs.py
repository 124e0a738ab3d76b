"""Job records: unknown and malformed ids, cancellation of a running and a queued job, states never regress."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from smoothcert.service.core.job_chunks import ChunkLedger
from smoothcert.service.core.jobs import JobStore, new_job_id
from tests.support.stack import wait_job


def long_job(client, model_id: str, inputs: int = 8) -> str:
    """A job that runs for many seconds: 8 inputs x 2,000,000 samples in batches of 500."""
    resp = client.post(
        "/v1/certify",
        json={
            "model_id": model_id,
            "inputs": np.full((inputs, 1, 8, 8), 0.5).tolist(),
            "sigma": 0.5,
            "n0": 10,
            "n": 2_000_000,
            "batch_size": 500,
            "seed": 0,
        },
    )
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]


def test_unknown_job_is_404(client):
    for resp in (
        client.get("/v1/jobs/does-not-exist"),
        client.get("/v1/jobs/does-not-exist/results.tsv"),
        client.delete("/v1/jobs/does-not-exist"),
    ):
        assert resp.status_code == 404 and "unknown job" in resp.json()["detail"]


def test_cancel_a_running_job(client, demo_model):
    job_id = long_job(client, demo_model["id"])
    running = wait_job(client, job_id, until=("running",))
    deadline = time.monotonic() + 30
    while running["progress"]["done"] == 0 and time.monotonic() < deadline:
        running = client.get(f"/v1/jobs/{job_id}").json()
    assert 0 < running["progress"]["done"] < running["progress"]["total"]
    resp = client.delete(f"/v1/jobs/{job_id}")
    assert resp.status_code in (200, 202) and resp.json()["cancel_requested"]
    job = wait_job(client, job_id, timeout=30)
    assert job["status"] == "canceled" and job["result"] is None and job["finished_at"]
    assert client.get(f"/v1/jobs/{job_id}/results.tsv").status_code == 409
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 200  # canceling again is harmless


def test_cancel_a_queued_job_behind_a_running_one(client, demo_model):
    first, second = long_job(client, demo_model["id"]), long_job(client, demo_model["id"], inputs=1)
    wait_job(client, first, until=("running",))
    resp = client.delete(f"/v1/jobs/{second}")
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    client.delete(f"/v1/jobs/{first}")
    assert wait_job(client, first)["status"] == "canceled"
    # The worker picks the canceled message up and must leave it canceled.
    time.sleep(0.5)
    assert client.get(f"/v1/jobs/{second}").json()["status"] == "canceled"


def test_cancel_after_success_is_409(client, demo_model):
    resp = client.post(
        "/v1/certify",
        json={
            "model_id": demo_model["id"],
            "inputs": np.full((1, 8, 8), 0.5).tolist(),
            "sigma": 0.25,
            "n0": 10,
            "n": 50,
        },
    )
    job_id = resp.json()["job_id"]
    assert wait_job(client, job_id)["status"] == "succeeded"
    resp = client.delete(f"/v1/jobs/{job_id}")
    assert resp.status_code == 409 and "succeeded" in resp.json()["detail"]


@pytest.fixture
def store(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield JobStore(client, ttl_s=60)
    client.close()


def test_store_transitions_only_from_the_allowed_states(store):
    job_id = new_job_id()
    store.create(job_id, "certify", {"n": 1}, total=10)
    assert store.start(job_id) == 1
    assert store.start(job_id) == 2  # a redelivery counts
    store.request_cancel(job_id)  # running: only the flag
    assert store.get(job_id).status == "running" and store.cancel_requested(job_id)
    assert store.mark_canceled(job_id)
    assert not store.succeed(job_id, {"results": []})  # canceled stays canceled
    assert store.start(job_id) == 0
    record = store.get(job_id)
    assert record.status == "canceled" and record.result is None and record.params == {"n": 1}


def test_store_round_trips_a_result(store):
    job_id = new_job_id()
    store.create(job_id, "predict", {})
    store.start(job_id)
    store.set_progress(job_id, 5, 10)
    assert store.succeed(job_id, {"results": [{"radius": 0.1}]})
    record = store.get(job_id)
    assert (record.done, record.total, record.result) == (5, 10, {"results": [{"radius": 0.1}]})
    assert record.started_at <= record.finished_at
    assert store.get(new_job_id()) is None


def test_internal_keys_and_other_non_ids_are_unknown_jobs(client, store):
    # A dataset job in flight has these keys beside its record; a cancel raises the flag key.
    job_id = new_job_id()
    store.create(job_id, "certify", {"dataset_id": "d", "chunks": 2}, total=10)
    ledger = ChunkLedger(store)
    assert ledger.start(job_id, 0) == 1
    ledger.set_progress(job_id, 0, 5)
    ledger.store(job_id, 0, {"rows": [], "provenance": {}})
    other = new_job_id()
    store.create(other, "certify", {}, total=1)
    store.request_cancel(other)
    for key in (
        f"{job_id}:chunk_done",
        f"{job_id}:chunk_results",
        f"{job_id}:chunk_deliveries",
        f"{other}:cancel",
    ):
        assert store.redis.exists("smoothcert:job:" + key)
    names = [
        f"{job_id}:chunk_done",
        f"{job_id}:chunk_results",
        f"{job_id}:chunk_deliveries",
        f"{other}:cancel",
        job_id.upper(),
        job_id + " ",
        job_id[:-1],
        f"{job_id}.0",
        "%2e%2e",
        "x" * 5000,
        "*",
    ]
    for name in names:
        for resp in (
            client.get(f"/v1/jobs/{name}"),
            client.get(f"/v1/jobs/{name}/results.tsv"),
            client.delete(f"/v1/jobs/{name}"),
        ):
            assert resp.status_code == 404, (name, resp.status_code, resp.text)
            detail = resp.json()["detail"]
            assert (
                detail.startswith("unknown job")
                and "job ids are a UUID in lowercase hex, 8-4-4-4-12" in detail
            )
    assert store.get(job_id).status == "running" and ledger.results(job_id)  # nothing was touched
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
