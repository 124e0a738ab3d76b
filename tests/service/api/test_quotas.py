"""Bounded work per key and per job, on real processes: datasets stored in their uploaded dtype,
the per-key storage quota (datasets and job inputs, and the sweep of inputs an API left behind),
the per-key active-jobs quota, the per-job sample budget, and dataset jobs counted against the
queue bound by their chunks.

Extra APIs, with keys of their own so that their quotas start empty: ``big`` (the session's
Redis and worker, default caps) for the amplification test; ``quota`` (the session's Redis and
worker) with a small storage quota and one active job per key; and two on Redis database
IDLE_DB, where no worker listens (jobs stay queued), with IDLE_ACTIVE active jobs per key and
chunks of 2 inputs: ``idle`` with a queue bound of BOUND messages, ``roomy`` with the default
bound (so that rooms held by concurrent submissions do not refuse them first). That database is
emptied before each test that uses it. The job-inputs tests have APIs of their own too
(``inputs_apis``, and one that a test kills).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
import redis

from smoothcert.service.api.limits import STORAGE_PREFIX, STORAGE_TTL_MS, Limits, _held
from smoothcert.service.core.dataset_store import block_size, disk_bytes
from smoothcert.service.core.jobs import JobStore, active_jobs
from smoothcert.service.core.queue import QUEUE, queue_depth
from smoothcert.service.core.settings import Settings
from tests.support.hostile_models import linear_onnx
from tests.support.proc import memory_bytes
from tests.support.stack import (
    ADMIN_KEY,
    ORPHAN_INPUTS_GRACE_S,
    account_key,
    other_db,
    scratch_db,
    stack_env,
    start_api,
    stop_process,
    upload_dataset,
    upload_model_file,
    wait_for,
    wait_job,
)

# Each API here serves an account of its own (made with POST /v1/keys), so that its quotas count
# only its own jobs and datasets on the Redis and data dir the suite shares.
QUOTA_USER, QUOTA_ADMIN = "quotas-user", "quotas-admin-key-0123456789"
IDLE_USER, IDLE_ADMIN = "quotas-idle", "quotas-idle-admin-key-0123456789"
STORAGE_QUOTA = (
    64 << 10
)  # one dataset of 500 8x8 uint8 images (36,256 bytes stored) fits, two do not
IDLE_DB, BOUND, CHUNK, IDLE_ACTIVE = 13, 5, 2, 3
TINY = {"sigma": 0.25, "n0": 10, "n": 50}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def npz(compressed: bool = False, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


@pytest.fixture(scope="module")
def digits(demo_paths):
    return np.load(demo_paths["test_x"]), np.load(demo_paths["test_y"])


@pytest.fixture(scope="module")
def big(redis_url, data_dir, worker):
    """An API with the default dataset caps and quotas, chunks of 50; its process and a user client."""
    env = stack_env(redis_url, data_dir, SMOOTHCERT_CHUNK_SIZE="50")
    for name in ("SMOOTHCERT_MAX_INPUTS", "SMOOTHCERT_MAX_REQUEST_BYTES"):
        env.pop(name)
    proc, url = start_api(env, data_dir / "api-quotas-big.log")
    key = account_key(url, ADMIN_KEY, "quotas-big")
    with httpx.Client(base_url=url, headers=bearer(key), timeout=120) as client:
        yield proc, client
    stop_process(proc)


@pytest.fixture(scope="module")
def quota(redis_url, data_dir, worker):
    """An API with a storage quota of STORAGE_QUOTA bytes and one active job per key: user and
    admin clients."""
    env = stack_env(
        redis_url,
        data_dir,
        SMOOTHCERT_ADMIN_KEY=QUOTA_ADMIN,
        SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY=str(STORAGE_QUOTA),
        SMOOTHCERT_MAX_ACTIVE_JOBS_PER_KEY="1",
    )
    proc, url = start_api(env, data_dir / "api-quotas.log")
    with (
        httpx.Client(
            base_url=url, headers=bearer(account_key(url, QUOTA_ADMIN, QUOTA_USER)), timeout=90
        ) as user,
        httpx.Client(base_url=url, headers=bearer(QUOTA_ADMIN), timeout=90) as admin,
    ):
        yield {"user": user, "admin": admin}
    stop_process(proc)


@pytest.fixture(scope="module")
def idle_apis(redis_url, data_dir, worker):
    """Two APIs on database IDLE_DB (no worker) with chunks of CHUNK inputs, IDLE_ACTIVE active
    jobs per key, the default n and input caps and sample budget: one with a bound of BOUND
    messages, one with the default bound. Their URLs."""
    urls = {}
    for name, bound in (("idle", BOUND), ("roomy", None)):
        env = stack_env(
            other_db(redis_url, IDLE_DB),
            data_dir,
            SMOOTHCERT_ADMIN_KEY=IDLE_ADMIN,
            SMOOTHCERT_CHUNK_SIZE=str(CHUNK),
            SMOOTHCERT_MAX_ACTIVE_JOBS_PER_KEY=str(IDLE_ACTIVE),
        )
        if bound is not None:
            env["SMOOTHCERT_MAX_QUEUED_MESSAGES"] = str(bound)
        for cap in ("SMOOTHCERT_MAX_N", "SMOOTHCERT_MAX_INPUTS", "SMOOTHCERT_MAX_REQUEST_BYTES"):
            env.pop(cap)
        urls[name] = start_api(env, data_dir / f"api-quotas-{name}.log")
    yield {name: url for name, (_, url) in urls.items()}
    for proc, _ in urls.values():
        stop_process(proc)


def on_idle_db(url: str, redis_url: str):
    r = redis.Redis.from_url(other_db(redis_url, IDLE_DB))
    r.flushdb()
    with (
        httpx.Client(
            base_url=url, headers=bearer(account_key(url, IDLE_ADMIN, IDLE_USER)), timeout=90
        ) as user,
        httpx.Client(base_url=url, headers=bearer(IDLE_ADMIN), timeout=90) as admin,
    ):
        yield {"user": user, "admin": admin, "redis": r}
    r.flushdb()
    r.close()


@pytest.fixture
def idle(idle_apis, redis_url):
    """The API with a bound of BOUND messages on an emptied database: user and admin clients, and
    a Redis client on it."""
    yield from on_idle_db(idle_apis["idle"], redis_url)


@pytest.fixture
def roomy(idle_apis, redis_url):
    """As ``idle``, with the default queue bound."""
    yield from on_idle_db(idle_apis["roomy"], redis_url)


def job_records(r: redis.Redis) -> list[str]:
    return sorted(
        k.decode() for k in r.scan_iter(match="smoothcert:job:*") if k.decode().count(":") == 2
    )


def folders(path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


# --- finding 3: datasets stored in their uploaded dtype ------------------------------------


def test_a_compressible_uint8_upload_is_stored_as_uint8_without_a_float32_copy(
    big, digits, data_dir, demo_model
):
    proc, client = big
    rows = 400_000  # 25.6 MB of uint8 pixels, 102 MB as float32; about 30 kB zipped
    pixels = np.zeros((rows, 1, 8, 8), dtype=np.uint8)
    pixels[: len(digits[0])] = np.round(digits[0] * 255).astype(np.uint8)
    labels = np.zeros(rows, dtype=np.int64)
    labels[: len(digits[1])] = digits[1]
    data = npz(compressed=True, x=pixels, y=labels)
    assert len(data) < 256 << 10
    # A first small upload, so that what one upload allocates anyway is in the baseline.
    warm = upload_dataset(client, npz(x=pixels[:10], y=labels[:10]), "warm.npz")
    assert warm.status_code == 201, warm.text
    assert client.delete(f"/v1/datasets/{warm.json()['id']}").status_code == 204
    before = memory_bytes(proc.pid)
    resp = upload_dataset(client, data, "zeros.npz")
    assert resp.status_code == 201, resp.text
    grown = memory_bytes(proc.pid) - before
    record = resp.json()
    assert (record["num_inputs"], record["input_shape"], record["source_dtype"]) == (
        rows,
        [1, 8, 8],
        "uint8",
    )

    # On disk: the uint8 bytes and the labels as uploaded, plus two .npy headers; no float32.
    folder = data_dir / "datasets" / record["id"]
    on_disk = sum(p.stat().st_size for p in folder.iterdir() if p.name != "meta.json")
    assert on_disk == record["stored_bytes"] <= pixels.nbytes + labels.nbytes + 2 * 128
    stored = np.load(folder / "x.npy", mmap_mode="r")
    assert stored.dtype == np.uint8 and np.array_equal(
        stored[: len(digits[0])], pixels[: len(digits[0])]
    )
    # The API checked and wrote it block by block: its peak memory grew by less than the uint8
    # array itself (the float32 copy an upload used to make is four times that).
    assert grown < pixels.nbytes, f"the API's peak memory grew by {grown} bytes"

    # A dataset job over it gives the rows of the same pixels uploaded as float32.
    floats = upload_dataset(
        client, npz(x=pixels[:100].astype(np.float32) / np.float32(255), y=labels[:100]), "f32.npz"
    )
    assert floats.status_code == 201, floats.text
    assert floats.json()["source_dtype"] == "float32"
    job = {
        "model_id": demo_model["id"],
        "limit": 100,
        "sigma": 0.25,
        "n0": 10,
        "n": 100,
        "seed": 17,
    }
    results = []
    for dataset_id in (record["id"], floats.json()["id"]):
        accepted = client.post("/v1/certify", json={**job, "dataset_id": dataset_id})
        assert accepted.status_code == 202, accepted.text
        done = wait_job(client, accepted.json()["job_id"], timeout=180)
        assert done["status"] == "succeeded", done["error"]
        results.append(done["result"]["results"])
    assert len(results[0]) == 100 and strip(results[0]) == strip(results[1])
    assert [r["label"] for r in results[0]] == digits[1][:100].tolist()
    for dataset_id in (record["id"], floats.json()["id"]):
        assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    assert not folder.exists()


def test_uint16_pixels_are_stored_as_uint16_and_scaled_when_read(big, data_dir):
    _, client = big
    pixels = np.random.default_rng(3).integers(0, 65536, (6, 1, 8, 8), dtype=np.uint16)
    resp = upload_dataset(
        client, npz(x=pixels.astype(">u2"), y=np.arange(6, dtype=np.uint8))
    )  # big-endian too
    assert resp.status_code == 201, resp.text
    record = resp.json()
    assert record["source_dtype"] == ">u2"
    folder = data_dir / "datasets" / record["id"]
    assert (
        np.load(folder / "x.npy").dtype == np.dtype("=u2")
        and np.load(folder / "y.npy").dtype == np.uint8
    )
    assert record["stored_bytes"] == pixels.nbytes + 6 + 2 * 128
    assert client.delete(f"/v1/datasets/{record['id']}").status_code == 204


# --- per-key storage quota -------------------------------------------------------------------


def test_storage_quota_refuses_an_upload_past_it_until_a_delete_frees_room(
    quota, data_dir, redis_url
):
    user, admin = quota["user"], quota["admin"]
    dataset = npz(x=np.zeros((500, 1, 8, 8), dtype=np.uint8), y=np.zeros(500, dtype=np.int64))
    first = upload_dataset(user, dataset, "first.npz")
    assert first.status_code == 201, first.text
    used, disk = first.json()["stored_bytes"], first.json()["disk_bytes"]
    assert used == 500 * 64 + 500 * 8 + 2 * 128
    block = os.statvfs(data_dir).f_frsize  # x, y, meta.json and the folder in whole blocks
    assert disk == block * (-(-(500 * 64 + 128) // block) + -(-(500 * 8 + 128) // block) + 2)
    meta = (data_dir / "datasets" / first.json()["id"] / "meta.json").read_text()
    assert json.loads(meta)["owner"] == QUOTA_USER  # the key's account

    stored = folders(data_dir / "datasets")
    refused = upload_dataset(user, dataset, "second.npz")
    assert refused.status_code == 413, refused.text
    detail = refused.json()["detail"]
    assert (
        "storage quota" in detail and f"already uses {disk} of its {STORAGE_QUOTA} bytes" in detail
    )
    assert f"would take {disk} bytes" in detail and "SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY" in detail
    assert folders(data_dir / "datasets") == stored
    assert [d["id"] for d in newest_datasets(user) if d["name"] == "second"] == []
    # Another key has a quota of its own.
    other = upload_dataset(admin, dataset, "admins.npz")
    assert other.status_code == 201, other.text

    assert user.delete(f"/v1/datasets/{first.json()['id']}").status_code == 204
    again = upload_dataset(user, dataset, "second.npz")
    assert again.status_code == 201, again.text

    # Uploads at the same time share the quota: of four, one fits beside nothing, none beside `again`.
    assert user.delete(f"/v1/datasets/{again.json()['id']}").status_code == 204
    barrier, answers = threading.Barrier(4), []

    def post(i: int) -> None:
        barrier.wait()
        answers.append(upload_dataset(user, dataset, f"race-{i}.npz"))

    threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in answers) == [201, 413, 413, 413], [r.text for r in answers]
    mine = [d for d in newest_datasets(user) if d["name"].startswith("race-")]
    assert len(mine) == 1 and mine[0]["stored_bytes"] == used
    for record in (*mine, other.json()):
        client = admin if record["id"] == other.json()["id"] else user
        assert client.delete(f"/v1/datasets/{record['id']}").status_code == 204
    r = redis.Redis.from_url(redis_url)  # refused uploads gave their reservations back
    assert r.hlen(f"smoothcert:storage:{QUOTA_USER}:amounts") <= 1


def test_models_count_against_the_storage_quota_until_deleted(quota, data_dir, tmp_path):
    url = str(quota["admin"].base_url)
    key = account_key(url, QUOTA_ADMIN, "quotas-models", "models")
    path = linear_onnx(tmp_path / "linear.onnx")
    models_dir = data_dir / "models"
    with httpx.Client(base_url=url, headers=bearer(key), timeout=90) as mine:
        first = upload_model_file(mine, path)
        assert first.status_code == 201, first.text
        folder = models_dir / first.json()["id"]
        # the model's file, its record and its folder, in whole blocks of the file system
        per_model = disk_bytes([p.stat().st_size for p in folder.iterdir()], block_size(folder))
        fits = STORAGE_QUOTA // per_model
        kept = [first.json()["id"]]
        for _ in range(fits - 1):
            resp = upload_model_file(mine, path)
            assert resp.status_code == 201, resp.text
            kept.append(resp.json()["id"])
        stored = folders(models_dir)
        refused = upload_model_file(mine, path)
        assert refused.status_code == 413, refused.text
        detail = refused.json()["detail"]
        assert f"storage quota: this model takes {per_model} bytes stored" in detail
        assert f"already uses {fits * per_model} of its {STORAGE_QUOTA} bytes" in detail
        assert folders(models_dir) == stored  # nothing of it kept
        assert mine.delete(f"/v1/models/{kept.pop()}").status_code == 204
        again = upload_model_file(mine, path)
        assert again.status_code == 201, again.text
        kept.append(again.json()["id"])
        for model_id in kept:
            assert mine.delete(f"/v1/models/{model_id}").status_code == 204
    # The admin account (the operator's; it owns the demo model, past this quota alone) has none.
    admins = upload_model_file(quota["admin"], path)
    assert admins.status_code == 201, admins.text
    assert quota["admin"].delete(f"/v1/models/{admins.json()['id']}").status_code == 204


def newest_datasets(client: httpx.Client) -> list[dict]:
    return client.get("/v1/datasets", params={"limit": 100}).json()["datasets"]


def test_a_tiny_dataset_counts_its_blocks_on_disk_not_its_bytes(quota, data_dir):
    user = quota["user"]
    block = os.statvfs(data_dir).f_frsize
    tiny = npz(x=np.zeros((1, 1, 8, 8), dtype=np.uint8), y=np.zeros(1, dtype=np.int64))
    fits = STORAGE_QUOTA // (4 * block)  # x, y, meta.json and the folder: a block each
    answers = [upload_dataset(user, tiny, f"tiny-{i}.npz") for i in range(fits + 1)]
    assert [a.status_code for a in answers] == [201] * fits + [413], answers[-1].text
    record = answers[0].json()
    assert record["stored_bytes"] == 2 * 128 + 64 + 8 and record["disk_bytes"] == 4 * block
    folder = data_dir / "datasets" / record["id"]
    assert len(list(folder.iterdir())) == 3  # x.npy, y.npy, meta.json
    detail = answers[-1].json()["detail"]
    assert f"would take {4 * block} bytes" in detail
    assert f"already uses {fits * 4 * block} of its {STORAGE_QUOTA} bytes" in detail
    for answer in answers[:fits]:
        assert user.delete(f"/v1/datasets/{answer.json()['id']}").status_code == 204


# --- per-key active jobs ---------------------------------------------------------------------


def test_one_active_job_per_key_then_429_until_it_ends(quota, demo_model):
    user, admin = quota["user"], quota["admin"]
    long = {
        "model_id": demo_model["id"],
        "inputs": np.full((1, 8, 8), 0.5).tolist(),
        "sigma": 0.5,
        "n0": 10,
        "n": 2_000_000,
        "batch_size": 500,
        "seed": 0,
    }
    small = {"model_id": demo_model["id"], "inputs": np.full((1, 8, 8), 0.5).tolist(), **TINY}
    first = user.post("/v1/certify", json=long)
    assert first.status_code == 202, first.text
    wait_job(user, first.json()["job_id"], until=("running",))
    refused = user.post("/v1/certify", json=small)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    detail = refused.json()["detail"]
    assert (
        "1 jobs queued or running, its quota is 1" in detail
        and "SMOOTHCERT_MAX_ACTIVE_JOBS_PER_KEY" in detail
    )
    trained = admin.post("/v1/train", json={"dataset": "digits", "epochs": 1})  # another key
    assert trained.status_code == 202, trained.text
    assert admin.delete(f"/v1/jobs/{trained.json()['job_id']}").status_code in (200, 202)

    assert user.delete(f"/v1/jobs/{first.json()['job_id']}").status_code in (200, 202)
    assert wait_job(user, first.json()["job_id"], timeout=60)["status"] == "canceled"
    second = user.post("/v1/certify", json=small)  # canceled frees the slot
    assert second.status_code == 202, second.text
    assert wait_job(user, second.json()["job_id"])["status"] == "succeeded"
    third = user.post("/v1/certify", json=small)  # and so does succeeded
    assert third.status_code == 202, third.text
    assert wait_job(user, third.json()["job_id"])["status"] == "succeeded"
    assert wait_job(admin, trained.json()["job_id"], timeout=120)["status"] in (
        "canceled",
        "succeeded",
    )


def test_concurrent_submissions_never_pass_the_active_quota(roomy, data_dir, demo_model):
    user, r = roomy["user"], roomy["redis"]
    job = {"model_id": demo_model["id"], "inputs": np.full((1, 8, 8), 0.5).tolist(), **TINY}
    jobs_dir = folders(data_dir / "jobs")
    barrier, answers = threading.Barrier(8), []

    def post(seed: int) -> None:
        barrier.wait()
        answers.append(user.post("/v1/certify", json={**job, "seed": seed}))

    threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = [a.json()["job_id"] for a in answers if a.status_code == 202]
    refused = [a for a in answers if a.status_code != 202]
    assert len(accepted) == IDLE_ACTIVE and {a.status_code for a in refused} == {429}, [
        a.text for a in answers
    ]
    assert all(f"its quota is {IDLE_ACTIVE}" in a.json()["detail"] for a in refused)
    # A refused submission leaves no record and no inputs behind.
    assert job_records(r) == sorted(f"smoothcert:job:{j}" for j in accepted)
    assert len(folders(data_dir / "jobs")) == len(jobs_dir) + IDLE_ACTIVE
    assert active_jobs(r, IDLE_USER) == IDLE_ACTIVE

    # Every way out of queued/running frees a slot: canceled (API), failed and succeeded (as a
    # worker writes them).
    store = JobStore(r)
    assert user.delete(f"/v1/jobs/{accepted[0]}").status_code == 200
    assert store.fail(accepted[1], "the worker gave up")
    assert store.start(accepted[2]) and store.succeed(accepted[2], {"results": []})
    assert active_jobs(r, IDLE_USER) == 0
    again = [
        user.post("/v1/certify", json={**job, "seed": 100 + i}) for i in range(IDLE_ACTIVE + 1)
    ]
    assert [a.status_code for a in again] == [202] * IDLE_ACTIVE + [429]
    # A record that expires while queued stops counting (its slot is not lost).
    r.pexpire(f"smoothcert:job:{again[0].json()['job_id']}", 1)
    store.redis.zadd(f"smoothcert:owner:{IDLE_USER}:active", {again[0].json()["job_id"]: 1})
    assert user.post("/v1/certify", json={**job, "seed": 200}).status_code == 202


# --- per-job sample budget -------------------------------------------------------------------


def test_a_job_over_the_sample_budget_is_refused_and_nothing_is_stored(idle, data_dir, demo_model):
    user, r = idle["user"], idle["redis"]
    inputs = np.zeros((10_000, 1, 8, 8), dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, inputs)
    form = {"model_id": demo_model["id"], "sigma": "0.25", "n0": "100", "n": "1000000"}
    jobs_dir = folders(data_dir / "jobs")
    huge = user.post("/v1/certify", data=form, files=[("inputs", ("x.npy", buf.getvalue()))])
    assert huge.status_code == 422, huge.text
    detail = huge.json()["detail"]
    assert "10000 inputs x 1000100 samples (n0 + n) = 10001000000 samples" in detail
    assert "budget of 2000000000 samples per job (SMOOTHCERT_MAX_JOB_SAMPLES)" in detail
    predict = user.post(
        "/v1/certify",
        data={**form, "mode": "predict"},
        files=[("inputs", ("x.npy", buf.getvalue()))],
    )
    assert (
        predict.status_code == 422
        and "10000 inputs x 1000000 samples (n) = 10000000000" in predict.text
    )
    radius = user.post(
        "/v1/certify",
        data={**form, "target_radius": "0.1"},
        files=[("inputs", ("x.npy", buf.getvalue()))],
    )
    assert radius.status_code == 422 and "1000100 samples (n0 + n)" in radius.text

    # A dataset job counts the inputs it covers.
    dataset = upload_dataset(
        user,
        npz(
            compressed=True,
            x=np.zeros((10_000, 1, 8, 8), dtype=np.uint8),
            y=np.zeros(10_000, dtype=np.int64),
        ),
    )
    assert dataset.status_code == 201, dataset.text
    over = user.post(
        "/v1/certify",
        json={
            "model_id": demo_model["id"],
            "dataset_id": dataset.json()["id"],
            "sigma": 0.25,
            "n0": 100,
            "n": 1_000_000,
        },
    )
    assert over.status_code == 422 and "10000 inputs x 1000100 samples" in over.json()["detail"]
    assert (
        job_records(r) == []
        and folders(data_dir / "jobs") == jobs_dir
        and queue_depth(r, QUEUE) == 0
    )

    # The next valid request passes; Cohen's n = 100,000 over 10,000 inputs fits the default budget.
    ok = user.post(
        "/v1/certify", data={**form, "n": "100000"}, files=[("inputs", ("x.npy", buf.getvalue()))]
    )
    assert ok.status_code == 202, ok.text
    assert user.get(ok.headers["Location"]).json()["progress"]["total"] == 10_000 * 100_100
    assert user.delete(f"/v1/datasets/{dataset.json()['id']}").status_code == 204


# --- dataset jobs against the queue bound ------------------------------------------------------


def test_a_dataset_job_that_would_overfill_the_queue_is_refused_whole(idle, demo_model):
    user, r = idle["user"], idle["redis"]
    dataset = upload_dataset(
        user, npz(x=np.zeros((20, 1, 8, 8), dtype=np.uint8), y=np.zeros(20, dtype=np.int64))
    )
    assert dataset.status_code == 201, dataset.text
    job = {"model_id": demo_model["id"], "dataset_id": dataset.json()["id"], **TINY}

    assert user.post("/v1/certify", json={**job, "limit": 6}).status_code == 202  # 3 chunks
    assert queue_depth(r, QUEUE) == 3
    records = job_records(r)
    refused = user.post("/v1/certify", json={**job, "limit": 6})  # 3 more: 6 > 5
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    detail = refused.json()["detail"]
    assert (
        "queue is full: 3 messages wait, the bound is 5" in detail
        and "needs 3, one per chunk" in detail
    )
    assert queue_depth(r, QUEUE) == 3 and job_records(r) == records
    never = user.post("/v1/certify", json=job)  # 10 chunks > 5
    assert never.status_code == 422 and "10 chunks" in never.json()["detail"]
    assert (
        "could never be queued" in never.json()["detail"]
        and "at most 10 inputs" in never.json()["detail"]
    )
    fits = user.post("/v1/certify", json={**job, "limit": 4})  # 2 chunks: exactly 5
    assert fits.status_code == 202, fits.text
    assert queue_depth(r, QUEUE) == BOUND
    single = user.post(
        "/v1/certify",
        json={"model_id": demo_model["id"], "inputs": np.zeros((1, 8, 8)).tolist(), **TINY},
    )
    assert single.status_code == 503 and "queue is full" in single.json()["detail"]


def test_concurrent_dataset_jobs_never_take_the_queue_past_the_bound(idle, demo_model):
    user, admin, r = idle["user"], idle["admin"], idle["redis"]
    dataset = upload_dataset(
        user, npz(x=np.zeros((4, 1, 8, 8), dtype=np.uint8), y=np.zeros(4, dtype=np.int64))
    )
    job = {
        "model_id": demo_model["id"],
        "dataset_id": dataset.json()["id"],
        **TINY,
    }  # 2 chunks each
    barrier, answers = threading.Barrier(6), []

    def post(client: httpx.Client, seed: int) -> None:
        barrier.wait()
        answers.append(client.post("/v1/certify", json={**job, "seed": seed}))

    threads = [threading.Thread(target=post, args=((user, admin)[i % 2], i)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(a.status_code for a in answers)
    assert codes == [202, 202, 503, 503, 503, 503], [a.text for a in answers]
    assert queue_depth(r, QUEUE) == 4 and len(job_records(r)) == 2
    assert (
        not list(r.scan_iter(match="smoothcert:queue-rooms:*:amounts"))
        or r.hlen(f"smoothcert:queue-rooms:{QUEUE}:amounts") == 0
    )


def test_a_reservation_still_counts_for_an_upload_that_listed_the_datasets_before_it_was_stored(
    redis_url, tmp_path
):
    # Three uploads of one key, 1000 bytes each, quota 1500. A is reserved and stored; C lists the
    # datasets after A was stored; B listed them before. However the three interleave, A counts
    # once for each of them: C through the listing, B through A's reservation, which C must
    # therefore not have dropped (it once did, and B then passed the quota).
    with scratch_db(redis_url, 12) as db:
        limits = Limits(db, Settings(data_dir=tmp_path, max_storage_bytes_per_key=1500))
        keys = _held(STORAGE_PREFIX + "caller")
        # args: upload id, bytes it stores, quota, bytes of the listed datasets, ttl, their ids
        assert limits._storage(keys=keys, args=["A", 1000, 1500, 0, STORAGE_TTL_MS])[0] == 1
        assert limits._storage(keys=keys, args=["C", 1000, 1500, 1000, STORAGE_TTL_MS, "A"]) == [
            0,
            1000,
        ]
        assert limits._storage(keys=keys, args=["B", 1000, 1500, 0, STORAGE_TTL_MS]) == [0, 1000]


# --- job inputs against the storage quota -------------------------------------------------------

INPUTS_USER, WORKED_USER, KILLED_USER = "quotas-inputs", "quotas-worked", "quotas-killed"
DIGITS_10K = np.random.default_rng(5).random((10_000, 1, 8, 8), dtype=np.float32)
INPUTS_10K = DIGITS_10K.nbytes + 128  # 2,560,128 bytes saved, the .npy header included
INPUTS_QUOTA = 6 << 20  # two jobs of 10,000 inputs fit, three do not
WORKED_QUOTA = 128 << 10  # two jobs of 200 inputs (56 KiB each, in 4 KiB blocks) and no dataset


def counted(data_dir, file_bytes: int) -> int:
    """What a job's inputs file of ``file_bytes`` counts against the quota: it and its folder in
    whole blocks, as a dataset's files count."""
    return disk_bytes([file_bytes], block_size(data_dir))


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def post_inputs(client: httpx.Client, model_id: str, x: np.ndarray, **fields) -> httpx.Response:
    form = {"model_id": model_id, **{k: str(v) for k, v in {**TINY, **fields}.items()}}
    return client.post("/v1/certify", data=form, files=[("inputs", ("x.npy", npy(x)))])


def reserved(r: redis.Redis, account: str) -> dict[str, int]:
    """What ``account`` holds of its storage quota, by token."""
    held = r.hgetall(f"smoothcert:storage:{account}:amounts")
    return {k.decode(): int(v) for k, v in held.items()}


def folder_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


@pytest.fixture(scope="module")
def inputs_apis(redis_url, data_dir, worker):
    """Two APIs with the default input caps and keys of their own: ``idle``, on database IDLE_DB (no
    worker: its jobs stay queued), with a storage quota of INPUTS_QUOTA; ``worked``, on the
    session's Redis and worker, with WORKED_QUOTA. Their URLs."""
    urls = {}
    for name, url, quota in (
        ("idle", other_db(redis_url, IDLE_DB), INPUTS_QUOTA),
        ("worked", redis_url, WORKED_QUOTA),
    ):
        env = stack_env(url, data_dir, SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY=str(quota))
        for cap in ("SMOOTHCERT_MAX_INPUTS", "SMOOTHCERT_MAX_REQUEST_BYTES"):
            env.pop(cap)
        urls[name] = start_api(env, data_dir / f"api-quotas-inputs-{name}.log")
    yield {name: url for name, (_, url) in urls.items()}
    for proc, _ in urls.values():
        stop_process(proc)


def test_canceled_queued_jobs_leave_no_inputs_and_inputs_count_with_datasets(
    inputs_apis, redis_url, data_dir, demo_model
):
    r = redis.Redis.from_url(other_db(redis_url, IDLE_DB))
    r.flushdb()
    jobs_dir, held = data_dir / "jobs", counted(data_dir, INPUTS_10K)
    before = folders(jobs_dir)
    key = account_key(inputs_apis["idle"], ADMIN_KEY, INPUTS_USER)  # after the flush
    with httpx.Client(base_url=inputs_apis["idle"], headers=bearer(key), timeout=90) as user:
        # Submit then cancel, 25 times: each job's inputs are gone with its cancel.
        peak = 0
        for seed in range(25):
            accepted = post_inputs(user, demo_model["id"], DIGITS_10K, seed=seed)
            assert accepted.status_code == 202, accepted.text
            job_id = accepted.json()["job_id"]
            assert (jobs_dir / job_id / "inputs.npy").stat().st_size == INPUTS_10K
            assert reserved(r, INPUTS_USER) == {f"job:{job_id}": held}
            mine = set(folders(jobs_dir)) - set(before)
            peak = max(peak, sum(folder_bytes(jobs_dir / f) for f in mine))
            assert user.delete(f"/v1/jobs/{job_id}").status_code == 200
            assert not (jobs_dir / job_id).exists()
        assert peak == INPUTS_10K <= INPUTS_QUOTA
        assert folders(jobs_dir) == before and reserved(r, INPUTS_USER) == {}

        # Jobs kept queued: two fit the quota, a third is 413 and writes nothing.
        kept = [post_inputs(user, demo_model["id"], DIGITS_10K, seed=s) for s in (100, 101)]
        assert [k.status_code for k in kept] == [202, 202], [k.text for k in kept]
        refused = post_inputs(user, demo_model["id"], DIGITS_10K, seed=102)
        assert refused.status_code == 413, refused.text
        detail = refused.json()["detail"]
        assert "storage quota" in detail and "SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY" in detail
        assert f"would take {held} bytes" in detail
        assert f"already uses {2 * held} of its {INPUTS_QUOTA} bytes" in detail
        assert len(folders(jobs_dir)) == len(before) + 2
        assert len(job_records(r)) == 2 + 25

        # A dataset that fits the quota alone does not fit beside them, and does once they end.
        dataset = npz(x=np.zeros((20_000, 1, 8, 8), np.uint8), y=np.zeros(20_000, np.int64))
        stored = 20_000 * 64 + 20_000 * 8  # and its headers
        assert stored + (64 << 10) <= INPUTS_QUOTA < stored + 2 * held
        beside = upload_dataset(user, dataset)
        assert beside.status_code == 413, beside.text
        assert f"already uses {2 * held} of its" in beside.json()["detail"]
        for k in kept:
            assert user.delete(f"/v1/jobs/{k.json()['job_id']}").status_code == 200
        alone = upload_dataset(user, dataset)
        assert alone.status_code == 201, alone.text
        assert set(reserved(r, INPUTS_USER)) == {alone.json()["id"]}  # no job's inputs left
        assert folders(jobs_dir) == before
        assert user.delete(f"/v1/datasets/{alone.json()['id']}").status_code == 204
    r.flushdb()
    r.close()


def test_job_inputs_hold_the_quota_until_the_worker_ends_their_jobs(
    inputs_apis, redis_url, data_dir, demo_model
):
    r = redis.Redis.from_url(redis_url)
    jobs_dir, x = data_dir / "jobs", DIGITS_10K[:200]
    size = counted(data_dir, x.nbytes + 128)
    dataset = npz(x=np.zeros((500, 1, 8, 8), np.uint8), y=np.zeros(500, np.int64))
    key = account_key(inputs_apis["worked"], ADMIN_KEY, WORKED_USER)
    with httpx.Client(base_url=inputs_apis["worked"], headers=bearer(key), timeout=90) as user:
        running = post_inputs(user, demo_model["id"], x, n=2_000_000, batch_size=500)
        assert running.status_code == 202, running.text
        wait_job(user, running.json()["job_id"], until=("running",))
        queued = post_inputs(user, demo_model["id"], x)  # waits behind it: one worker process
        assert queued.status_code == 202, queued.text
        ids = [running.json()["job_id"], queued.json()["job_id"]]
        assert set(reserved(r, WORKED_USER)) == {f"job:{j}" for j in ids}

        refused = upload_dataset(user, dataset)  # fits alone, not beside the jobs
        assert refused.status_code == 413, refused.text
        assert f"already uses {2 * size} of its {WORKED_QUOTA} bytes" in refused.json()["detail"]

        # The running job is canceled (its worker stops it between batches); the queued one then
        # runs to the end. The worker deletes both jobs' inputs, and their bytes are free again.
        assert user.delete(f"/v1/jobs/{ids[0]}").status_code == 202
        assert wait_job(user, ids[0], timeout=60)["status"] == "canceled"
        assert wait_job(user, ids[1], timeout=60)["status"] == "succeeded"
        wait_for(
            lambda: (
                not any((jobs_dir / j).exists() for j in ids) and reserved(r, WORKED_USER) == {}
            ),
            15,
            "the worker to delete the ended jobs' inputs",
        )
        accepted = upload_dataset(user, dataset)
        assert accepted.status_code == 201, accepted.text
        assert user.delete(f"/v1/datasets/{accepted.json()['id']}").status_code == 204
    r.close()


def test_inputs_left_by_an_api_killed_before_it_recorded_the_job_are_swept(
    redis_url, data_dir, worker, demo_model
):
    """SIGKILL an API of its own after it wrote a job's inputs (its folder made, the file written
    or being written) and before it recorded the job; the session worker's sweep deletes them
    once ORPHAN_INPUTS_GRACE_S old and gives their bytes back."""
    r, jobs_dir = redis.Redis.from_url(redis_url), data_dir / "jobs"
    jobs_dir.mkdir(exist_ok=True)
    env = stack_env(redis_url, data_dir)
    for cap in ("SMOOTHCERT_MAX_INPUTS", "SMOOTHCERT_MAX_REQUEST_BYTES"):
        env.pop(cap)
    proc, url = start_api(env, data_dir / "api-quotas-killed.log")
    for thread in os.listdir(f"/proc/{proc.pid}/task"):  # slower than the test: a wider window
        os.setpriority(os.PRIO_PROCESS, int(thread), 19)
    key = account_key(url, ADMIN_KEY, KILLED_USER)
    client = httpx.Client(base_url=url, headers=bearer(key), timeout=30)
    orphan, answers = None, []

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the API may die under it
            answers.append(post_inputs(client, demo_model["id"], DIGITS_10K))

    for _ in range(50):  # stop the API in the window; when it got past it, try again
        before, deadline = set(os.listdir(jobs_dir)), time.monotonic() + 30
        sending = threading.Thread(target=send, daemon=True)
        sending.start()
        new: set[str] = set()
        while not new and time.monotonic() < deadline:
            new = set(os.listdir(jobs_dir)) - before
        os.kill(proc.pid, signal.SIGSTOP)
        assert new, f"no inputs written within 30 s: {[a.text for a in answers]}"
        [job_id] = new
        if not r.exists(f"smoothcert:job:{job_id}"):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            orphan = job_id
            break
        os.kill(proc.pid, signal.SIGCONT)
        sending.join(30)
        assert answers[-1].status_code == 202, answers[-1].text
        assert client.delete(f"/v1/jobs/{job_id}").status_code in (200, 202)
    client.close()
    if orphan is None:
        stop_process(proc)
    assert orphan is not None, "the API recorded the job each time before it could be stopped"
    stopped_at = time.monotonic()
    assert (jobs_dir / orphan).is_dir() and not r.exists(f"smoothcert:job:{orphan}")
    assert reserved(r, KILLED_USER)[f"job:{orphan}"] == counted(data_dir, INPUTS_10K)
    wait_for(
        lambda: (
            not (jobs_dir / orphan).exists() and f"job:{orphan}" not in reserved(r, KILLED_USER)
        ),
        ORPHAN_INPUTS_GRACE_S + 15,
        "the sweep to delete the orphaned inputs",
    )
    assert time.monotonic() - stopped_at >= ORPHAN_INPUTS_GRACE_S - 1  # not before its grace
    r.close()
