"""Dataset jobs end to end: upload an .npz, certify it in chunks on two workers, cancel, bad uploads.

This module runs a second worker beside the session's and its own API process, so that the
chunk size and the dataset caps can be small (both share the session's Redis and data folder).
"""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
import redis
from kombu.transport.redis import Channel

from smoothcert.service.core.contract import chunk_seed
from smoothcert.service.core.job_chunks import ChunkLedger
from smoothcert.service.core.jobs import JobStore, new_job_id, rfc3339
from tests.support.stack import (
    USER_KEY,
    stack_env,
    start_api,
    start_worker,
    stop_process,
    upload_dataset,
    wait_for,
    wait_job,
)

CHUNK = 50
LIMITS = {
    "SMOOTHCERT_CHUNK_SIZE": str(CHUNK),
    "SMOOTHCERT_MAX_DATASET_BYTES": str(256 << 10),
    "SMOOTHCERT_MAX_DATASET_UNPACKED_BYTES": str(1 << 20),
}
# runtime torch: the chunks are compared with the engine running the torch model in this process
JOB = {"sigma": 0.25, "n0": 10, "n": 100, "seed": 11, "runtime": "torch"}


@pytest.fixture(scope="module")
def second_worker(redis_url, data_dir, worker) -> str:
    """Another worker process (the session's is the first); its Celery hostname."""
    log = data_dir / "worker-second.log"
    proc, name = start_worker(stack_env(redis_url, data_dir), log, "second@%h")
    yield name
    stop_process(proc)


@pytest.fixture(scope="module")
def api(redis_url, data_dir, worker, second_worker):
    """A client of an API with chunks of 50 inputs and small dataset caps, authorized as a user."""
    proc, url = start_api(stack_env(redis_url, data_dir, **LIMITS), data_dir / "api-datasets.log")
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=90
    ) as client:
        yield client
    stop_process(proc)


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits(demo_paths):
    return np.load(demo_paths["test_x"]), np.load(demo_paths["test_y"])


@pytest.fixture(scope="module")
def dataset(api, digits) -> dict:
    resp = upload_dataset(api, npz(x=digits[0], y=digits[1]), "digits_test.npz")
    assert resp.status_code == 201, resp.text
    assert resp.headers["Location"] == f"/v1/datasets/{resp.json()['id']}"
    return resp.json()


def certify(api, **body) -> str:
    resp = api.post("/v1/certify", json=body)
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]


@pytest.fixture(scope="module")
def finished(api, demo_model, dataset) -> dict:
    """The whole digits test split (359 inputs, 8 chunks) certified with seed 11."""
    job = wait_job(api, certify(api, model_id=demo_model["id"], dataset_id=dataset["id"], **JOB))
    assert job["status"] == "succeeded", job["error"]
    return job


def test_upload_answers_the_record_and_it_is_listed(api, dataset, digits):
    assert dataset["num_inputs"] == len(digits[0]) == 359
    assert dataset["input_shape"] == [1, 8, 8] and dataset["label_range"] == [0, 9]
    assert dataset["source_dtype"] == "float32" and dataset["name"] == "digits_test"
    assert api.get(f"/v1/datasets/{dataset['id']}").json() == dataset
    newest = api.get("/v1/datasets", params={"limit": 100}).json()["datasets"]
    assert dataset["id"] in [d["id"] for d in newest]
    assert dataset["created_time"] == rfc3339(dataset["created_at"])


def test_uint8_upload_and_delete(api, digits):
    pixels = (digits[0][:10] * 255).round().astype(np.uint8)
    resp = api.post(
        "/v1/datasets",
        files={"file": ("px.npz", npz(x=pixels, y=digits[1][:10]))},
        data={"name": "px"},
    )
    assert resp.status_code == 201, resp.text
    record = resp.json()
    assert record["source_dtype"] == "uint8" and record["name"] == "px"
    assert api.delete(f"/v1/datasets/{record['id']}").status_code == 204
    for resp in (
        api.get(f"/v1/datasets/{record['id']}"),
        api.delete(f"/v1/datasets/{record['id']}"),
    ):
        assert resp.status_code == 404 and "unknown dataset" in resp.json()["detail"]


def test_dataset_job_is_split_into_chunks_that_both_workers_run(finished, second_worker):
    assert finished["kind"] == "certify" and finished["params"]["chunks"] == 8
    assert finished["progress"] == {"done": 359 * 110, "total": 359 * 110, "unit": "samples"}
    provenance = finished["result"]["provenance"]
    chunks = provenance["chunks"]
    assert [(c["start"], c["stop"]) for c in chunks] == [
        (a, min(a + CHUNK, 359)) for a in range(0, 359, CHUNK)
    ]
    assert [c["seed"] for c in chunks] == [chunk_seed(11, i) for i in range(8)]
    assert (
        provenance["seed"] == 11
        and provenance["num_inputs"] == 359
        and provenance["chunk_size"] == CHUNK
    )
    # Both idle workers block on the queue when the 8 messages arrive, and each holds one at a time.
    assert second_worker in provenance["workers"] and len(provenance["workers"]) == 2, provenance[
        "workers"
    ]


def test_rows_are_in_dataset_order_with_labels_and_totals(finished, digits):
    rows = finished["result"]["results"]
    assert [r["index"] for r in rows] == list(range(359))
    assert [r["label"] for r in rows] == digits[1].tolist()
    assert all(r["n"] == 100 and r["radius"] <= r["radius_cap"] for r in rows)
    totals = finished["result"]["totals"]
    assert totals["inputs"] == 359 and totals["chunks"] == 8 and totals["images_per_s"] > 0
    assert totals["abstentions"] == sum(r["abstained"] for r in rows)
    correct = sum(r["prediction"] == r["label"] for r in rows if not r["abstained"])
    curve = finished["result"]["certified_accuracy"]
    assert curve[0] == {"radius": 0.0, "accuracy": correct / 359} and correct / 359 > 0.8
    assert all(a["accuracy"] >= b["accuracy"] for a, b in zip(curve, curve[1:]))


def test_each_chunk_is_the_engine_answer_for_its_seed(finished, demo_paths, digits):
    from smoothcert.models.loaders import load_model
    from smoothcert.worker.smoothing import RunOptions
    from smoothcert.worker.smoothing import certify as engine_certify

    model = load_model(demo_paths["safetensors"], device="cpu")
    rows = finished["result"]["results"]
    for chunk in finished["result"]["provenance"]["chunks"][
        6:
    ]:  # one full chunk and the short last one
        a, b = chunk["start"], chunk["stop"]
        direct = engine_certify(
            model,
            digits[0][a:b],
            0.25,
            n0=10,
            n=100,
            options=RunOptions(batch_size=chunk["batch_size"], seed=chunk["seed"]),
        ).to_dict()["results"]
        assert [(r["prediction"], r["n_a"], r["radius"]) for r in rows[a:b]] == [
            (r["prediction"], r["n_a"], r["radius"]) for r in direct
        ]


def test_the_same_seed_gives_the_same_rows(api, demo_model, dataset, finished):
    # The first two chunks again (limit=100 keeps their ranges, hence their seeds), on whichever workers.
    again = wait_job(
        api,
        certify(api, model_id=demo_model["id"], dataset_id=dataset["id"], limit=2 * CHUNK, **JOB),
    )
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(again["result"]["results"]) == strip(finished["result"]["results"][: 2 * CHUNK])


def test_skip_and_limit_and_the_tsv(api, demo_model, dataset, digits):
    job_id = certify(
        api, model_id=demo_model["id"], dataset_id=dataset["id"], skip=100, limit=60, **JOB
    )
    job = wait_job(api, job_id)
    assert job["params"]["chunks"] == 2 and job["progress"]["total"] == 60 * 110
    assert [r["index"] for r in job["result"]["results"]] == list(range(100, 160))
    lines = api.get(f"/v1/jobs/{job_id}/results.tsv").text.splitlines()
    assert len(lines) == 61 and lines[1].split("\t")[:2] == ["100", str(digits[1][100])]


def test_predict_over_a_dataset(api, demo_model, dataset):
    job = wait_job(
        api,
        certify(
            api,
            model_id=demo_model["id"],
            dataset_id=dataset["id"],
            limit=70,
            mode="predict",
            sigma=0.25,
            n=100,
            seed=2,
        ),
    )
    assert job["status"] == "succeeded" and job["kind"] == "predict"
    assert len(job["result"]["results"]) == 70 and 0.8 < job["result"]["accuracy"] <= 1


def test_cancel_stops_every_chunk(api, demo_model, dataset, redis_url):
    job_id = certify(
        api,
        model_id=demo_model["id"],
        dataset_id=dataset["id"],
        limit=2 * CHUNK,
        sigma=0.5,
        n0=10,
        n=2_000_000,
        batch_size=500,
        seed=0,
    )
    deadline = time.monotonic() + 30
    while (
        api.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] == 0
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert api.delete(f"/v1/jobs/{job_id}").status_code in (200, 202)
    job = wait_job(api, job_id, timeout=30)
    assert job["status"] == "canceled" and job["result"] is None
    # Both chunks stop between batches: their messages are acknowledged (each worker is free
    # again: one prefetched message per worker), progress freezes and both take new work.
    broker = redis.Redis.from_url(redis_url)
    wait_for(lambda: broker.hlen(Channel.unacked_key) == 0, 30, "both canceled chunks to end")
    broker.close()
    done = api.get(f"/v1/jobs/{job_id}").json()["progress"]["done"]
    assert 0 < done < job["progress"]["total"]
    after = wait_job(
        api,
        certify(api, model_id=demo_model["id"], dataset_id=dataset["id"], limit=2 * CHUNK, **JOB),
        timeout=30,
    )
    assert after["status"] == "succeeded" and len(after["result"]["provenance"]["workers"]) == 2
    assert api.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] == done


@pytest.mark.parametrize(
    "data,code,phrase",
    [
        (
            npz(x=np.array([{"a": 1}] * 3, dtype=object), y=np.zeros(3, dtype=int)),
            422,
            "pickled Python objects",
        ),
        (npz(x=np.zeros((3, 1, 8, 8))), 422, "lacks y"),
        (npz(x=np.full((3, 1, 8, 8), np.nan), y=np.zeros(3, dtype=int)), 422, "NaN"),
        (npz(x=np.full((3, 1, 8, 8), 2.0), y=np.zeros(3, dtype=int)), 422, "[0, 1]"),
        (
            npz(x=np.zeros((3, 1, 8, 8)), y=np.zeros(2, dtype=int)),
            422,
            "x holds 3 images but y holds 2",
        ),
        (b"not a zip", 422, "not an .npz"),
        (np.random.default_rng(0).bytes(300 << 10), 413, "limit of 262144 bytes"),
    ],
)
def test_bad_uploads_are_refused_with_a_message(api, data, code, phrase):
    resp = upload_dataset(api, data)
    assert resp.status_code == code, resp.text
    assert phrase in resp.json()["detail"]


def test_zip_bomb_is_refused_before_unzipping(api):
    buf = io.BytesIO()
    np.savez_compressed(
        buf, x=np.zeros((8192, 1, 8, 8), dtype=np.float32), y=np.zeros(8192, dtype=np.int64)
    )
    assert len(buf.getvalue()) < 64 << 10  # 2 MiB of arrays once unzipped
    resp = upload_dataset(api, buf.getvalue())
    assert resp.status_code == 413, resp.text
    assert (
        "unzip to" in resp.json()["detail"] and f"limit of {1 << 20} bytes" in resp.json()["detail"]
    )


def test_datasets_need_a_key(api):
    assert api.get("/v1/datasets", headers={"Authorization": ""}).status_code == 401


@pytest.fixture(scope="module")
def small_images(api) -> dict:
    """Valid 4x4 images with labels up to 12: they fit neither the digits model's shape nor its classes."""
    resp = upload_dataset(
        api, npz(x=np.zeros((3, 1, 4, 4), dtype=np.float32), y=np.array([0, 1, 12]))
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_bad_dataset_jobs_are_refused(api, demo_model, dataset, small_images):
    good = {"model_id": demo_model["id"], "dataset_id": dataset["id"], **JOB}
    cases = [
        (
            {"dataset_id": small_images["id"]},
            422,
            "holds inputs of shape [1, 4, 4], the model takes [1, 8, 8]",
        ),
        ({"dataset_id": "no-such-dataset"}, 404, "unknown dataset"),
        ({"inputs": np.zeros((1, 8, 8)).tolist()}, 422, "either inputs or dataset_id"),
        ({"labels": [1]}, 422, "do not send labels"),
        ({"skip": 359}, 422, "skip=359 leaves no inputs"),
        ({"limit": 0}, 422, "greater than or equal to 1"),
    ]
    for change, code, phrase in cases:
        resp = api.post("/v1/certify", json={**good, **change})
        assert resp.status_code == code, (change, resp.text)
        assert phrase in str(resp.json()["detail"]), (change, resp.text)
    resp = api.post(
        "/v1/certify",
        json={
            "model_id": demo_model["id"],
            "inputs": np.zeros((1, 8, 8)).tolist(),
            "skip": 1,
            **JOB,
        },
    )
    assert resp.status_code == 422 and "dataset jobs" in str(resp.json()["detail"])


def test_labels_outside_the_model_classes_are_refused(api, demo_model):
    resp = upload_dataset(api, npz(x=np.zeros((2, 1, 8, 8), dtype=np.float32), y=np.array([3, 10])))
    resp = api.post(
        "/v1/certify", json={"model_id": demo_model["id"], "dataset_id": resp.json()["id"], **JOB}
    )
    assert (
        resp.status_code == 422
        and "labels up to 10, the model's classes are [0, 10)" in resp.json()["detail"]
    )


@pytest.fixture
def ledger(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield ChunkLedger(JobStore(client, ttl_s=60))
    client.close()


def test_ledger_redelivery_overwrites_a_chunk_and_progress_sums_chunks(ledger):
    job_id = new_job_id()
    ledger.jobs.create(job_id, "certify", {}, total=100)
    assert (ledger.start(job_id, 0), ledger.start(job_id, 1), ledger.start(job_id, 0)) == (1, 1, 2)
    ledger.set_progress(job_id, 0, 30)
    ledger.set_progress(job_id, 1, 50)
    ledger.set_progress(job_id, 0, 10)  # chunk 0 was redelivered and starts over
    record = ledger.jobs.get(job_id)
    assert record.status == "running" and record.done == 60 and record.started_at
    assert ledger.store(job_id, 0, {"rows": [1]}) == 1
    assert ledger.store(job_id, 0, {"rows": [1]}) == 1  # a redelivered chunk counts once
    assert ledger.store(job_id, 1, {"rows": [2]}) == 2
    assert ledger.results(job_id) == {0: {"rows": [1]}, 1: {"rows": [2]}}
    assert ledger.jobs.succeed(job_id, {"results": []}) and not ledger.jobs.succeed(
        job_id, {"results": []}
    )
    assert ledger.start(job_id, 1) == 0  # a late delivery after success does nothing
    ledger.clear(job_id)
    assert ledger.results(job_id) == {}


def test_ledger_stops_chunks_of_canceled_and_failed_jobs(ledger):
    canceled, failed = new_job_id(), new_job_id()
    for job_id in (canceled, failed):
        ledger.jobs.create(job_id, "certify", {})
        ledger.start(job_id, 0)
        assert not ledger.should_stop(job_id)
    ledger.jobs.request_cancel(canceled)
    ledger.jobs.fail(failed, "chunk 3 broke")
    assert ledger.should_stop(canceled) and ledger.should_stop(failed)
    assert ledger.start(failed, 1) == 0


def test_only_the_uploading_account_or_the_admin_deletes_a_dataset(client, admin, digits):
    """Before, any valid key deleted any dataset (and so failed the jobs queued over it); now
    another account's dataset is an unknown one."""
    small = npz(x=digits[0][:4], y=digits[1][:4])
    by_admin = upload_dataset(admin, small).json()["id"]
    refused = client.delete(f"/v1/datasets/{by_admin}")
    assert refused.status_code == 404
    assert refused.json()["detail"] == f"unknown dataset {by_admin!r}"
    assert admin.get(f"/v1/datasets/{by_admin}").status_code == 200  # still there
    assert admin.delete(f"/v1/datasets/{by_admin}").status_code == 204
    by_user = upload_dataset(client, small).json()["id"]
    assert admin.delete(f"/v1/datasets/{by_user}").status_code == 204
    mine = upload_dataset(client, small).json()["id"]
    assert client.delete(f"/v1/datasets/{mine}").status_code == 204
