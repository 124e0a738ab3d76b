"""Backpressure on a real stack: the per-key rate limit, the queue bound, and Idempotency-Key.

The rate limit is tried on two extra API replicas with their own keys (so the session's buckets
stay untouched) sharing the session's Redis; the queue bound on a replica whose Redis URL names
database 1 of the same server, where no worker consumes, so its messages stay queued.
Idempotency runs on the session's API and worker.
"""

from __future__ import annotations

import io
import json
import math
import secrets
import threading
import time

import httpx
import numpy as np
import pytest
import redis

from smoothcert.service.api.idempotency import IdempotencyStore, fingerprint, json_content
from smoothcert.service.api.limits import queue_depth
from smoothcert.service.core.queue import QUEUE, TRAIN_QUEUE
from tests.support.stack import (
    ADMIN_KEY,
    USER_KEY,
    account_key,
    other_db,
    stack_env,
    start_api,
    stop_process,
    wait_job,
)

RATE = 6  # per minute: one submission every 10 s once the burst of 6 is spent
LIMIT_USER, LIMIT_ADMIN = "limits-user", "limits-admin-key-0123456789"  # account, admin key
CAP, CHUNK = 2, 2  # the database-1 replica: 2 waiting messages, dataset chunks of 2 inputs
IMAGE = np.full((1, 8, 8), 0.5).tolist()
TINY = {"sigma": 0.25, "n0": 10, "n": 50}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def replicas(redis_url, data_dir, worker):
    """Two API processes with a rate limit of RATE per minute and their own keys: clients of the
    user key on each (``user_a``, ``user_b``) and of the admin key on the first (``admin_a``)."""
    env = stack_env(
        redis_url,
        data_dir,
        SMOOTHCERT_RATE_LIMIT_PER_MINUTE=str(RATE),
        SMOOTHCERT_ADMIN_KEY=LIMIT_ADMIN,
    )
    procs = [start_api(env, data_dir / f"api-limits-{i}.log") for i in range(2)]
    (_, a), (_, b) = procs
    user = account_key(a, LIMIT_ADMIN, LIMIT_USER)  # one key, on both replicas
    with (
        client_for(a, user) as user_a,
        client_for(b, user) as user_b,
        client_for(a, LIMIT_ADMIN) as admin_a,
    ):
        yield {"user_a": user_a, "user_b": user_b, "admin_a": admin_a}
    for proc, _ in procs:
        stop_process(proc)


@pytest.fixture(scope="module")
def db1_url(redis_url) -> str:
    return other_db(redis_url, 1)


@pytest.fixture(scope="module")
def unconsumed(db1_url, data_dir, worker):
    """An API on database 1 (no worker there) with a bound of CAP messages per queue; its URL."""
    redis.Redis.from_url(db1_url).flushdb()  # the test counts what is queued there
    env = stack_env(
        db1_url, data_dir, SMOOTHCERT_MAX_QUEUED_MESSAGES=str(CAP), SMOOTHCERT_CHUNK_SIZE=str(CHUNK)
    )
    proc, url = start_api(env, data_dir / "api-db1.log")
    yield url
    stop_process(proc)
    redis.Redis.from_url(db1_url).flushdb()


def client_for(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers=bearer(key), timeout=90)


def jobs_with_seeds(client: redis.Redis, seeds: range) -> list[str]:
    """Ids of the job records in ``client``'s database whose parameters hold a seed in ``seeds``."""
    ids = []
    for key in client.scan_iter(match="smoothcert:job:*", count=1000):
        job_id = key.decode()[len("smoothcert:job:") :]
        if (
            ":" not in job_id
            and json.loads(client.hget(key, "params") or "{}").get("seed") in seeds
        ):
            ids.append(job_id)
    return ids


def jobs_with_seed(client: redis.Redis, seed: int) -> list[str]:
    return jobs_with_seeds(client, range(seed, seed + 1))


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def seed() -> int:
    return secrets.randbelow(2**40)


# --- rate limit ------------------------------------------------------------------------------


def test_rate_limit_per_key_shared_by_replicas_with_a_computed_retry_after(replicas, demo_model):
    user_a, user_b, admin_a = replicas["user_a"], replicas["user_b"], replicas["admin_a"]
    job = {"model_id": demo_model["id"], "inputs": IMAGE, **TINY, "seed": seed()}
    first = user_a.post("/v1/certify", json=job, headers={"Idempotency-Key": "rate-1"})
    assert first.status_code == 202, first.text
    # Every attempt counts, also one refused for an unknown model (cheap: no job is made).
    unknown = {**job, "model_id": "no-such-model"}
    codes = [
        (user_a, user_b)[i % 2].post("/v1/certify", json=unknown).status_code
        for i in range(RATE - 1)
    ]
    assert codes == [404] * (RATE - 1)

    refused = user_a.post("/v1/certify", json=unknown)
    assert refused.status_code == 429, refused.text
    assert "rate limit" in refused.json()["detail"]
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= math.ceil(60 / RATE)
    assert user_b.post("/v1/certify", json=unknown).status_code == 429  # the other replica agrees
    upload = user_b.post(
        "/v1/datasets", files={"file": ("d.npz", npz(x=np.zeros((1, 1, 8, 8)), y=[0]))}
    )
    assert upload.status_code == 429 and int(upload.headers["Retry-After"]) >= 1
    replay = user_b.post(
        "/v1/certify", json=job, headers={"Idempotency-Key": "rate-1"}
    )  # replays are free
    assert (replay.status_code, replay.json()) == (202, first.json())
    assert (
        admin_a.post("/v1/certify", json=unknown).status_code == 404
    )  # another key, another bucket

    time.sleep(retry_after)
    again = user_b.post("/v1/certify", json={**job, "seed": seed()})
    assert again.status_code == 202, again.text
    assert wait_job(user_b, again.json()["job_id"])["status"] == "succeeded"


# --- queue bound -----------------------------------------------------------------------------


def test_full_queue_refuses_with_503_and_leaves_nothing_behind(
    unconsumed, db1_url, data_dir, demo_model, demo_paths
):
    r1 = redis.Redis.from_url(db1_url)
    with client_for(unconsumed, USER_KEY) as user, client_for(unconsumed, ADMIN_KEY) as admin:
        check_full_queue(r1, user, admin, data_dir, demo_model, demo_paths)


def check_full_queue(
    r1: redis.Redis, user: httpx.Client, admin: httpx.Client, data_dir, demo_model, demo_paths
):
    x, y = np.load(demo_paths["test_x"])[:4], np.load(demo_paths["test_y"])[:4]
    dataset = user.post("/v1/datasets", files={"file": ("four.npz", npz(x=x, y=y))})
    assert dataset.status_code == 201, dataset.text
    # One dataset job of 4 inputs is 2 messages: the bound counts messages, so the queue is full.
    chunked = user.post(
        "/v1/certify",
        json={"model_id": demo_model["id"], "dataset_id": dataset.json()["id"], **TINY},
    )
    assert chunked.status_code == 202, chunked.text
    assert queue_depth(r1, QUEUE) == CAP

    records, folders = (
        len(list(r1.scan_iter(match="smoothcert:job:*"))),
        sorted((data_dir / "jobs").glob("*")),
    )
    job = {"model_id": demo_model["id"], "inputs": IMAGE, **TINY, "seed": seed()}
    refused = user.post("/v1/certify", json=job, headers={"Idempotency-Key": "full-1"})
    assert refused.status_code == 503, refused.text
    assert "queue is full" in refused.json()["detail"] and int(refused.headers["Retry-After"]) >= 1
    assert len(list(r1.scan_iter(match="smoothcert:job:*"))) == records
    assert sorted((data_dir / "jobs").glob("*")) == folders
    assert not list(r1.scan_iter(match="smoothcert:idempotency:*"))
    assert queue_depth(r1, QUEUE) == CAP

    # Uploads queue nothing; training has its own queue and bound.
    assert user.post("/v1/datasets", files={"file": ("four.npz", npz(x=x, y=y))}).status_code == 201
    train = {"dataset": "digits", "epochs": 1, "seed": 5}
    trained = [
        admin.post(
            "/v1/train", json={**train, "seed": s}, headers={"Idempotency-Key": f"train-{s}"}
        )
        for s in (5, 6)
    ]
    assert [r.status_code for r in trained] == [202, 202], [r.text for r in trained]
    repeat = admin.post(
        "/v1/train",
        json={"seed": 5, "epochs": 1, "dataset": "digits"},
        headers={"Idempotency-Key": "train-5"},
    )
    assert (repeat.status_code, repeat.json()) == (202, trained[0].json())
    assert queue_depth(r1, TRAIN_QUEUE) == CAP
    assert admin.post("/v1/train", json={**train, "seed": 7}).status_code == 503

    r1.delete(QUEUE)  # as if workers had taken the messages
    retried = user.post("/v1/certify", json=job, headers={"Idempotency-Key": "full-1"})
    assert retried.status_code == 202, retried.text
    assert jobs_with_seed(r1, job["seed"]) == [retried.json()["job_id"]]


# --- Idempotency-Key -------------------------------------------------------------------------


def test_repeat_with_the_same_key_returns_the_same_job(client, admin, redis_url, demo_model):
    job = {"model_id": demo_model["id"], "inputs": IMAGE, **TINY, "seed": seed()}
    key = {"Idempotency-Key": f"same-{job['seed']}"}
    first = client.post("/v1/certify", json=job, headers=key)
    assert first.status_code == 202, first.text
    # Key order and whitespace do not matter: the fingerprint is of the parsed JSON.
    reordered = json.dumps(dict(reversed(list(job.items()))), indent=2).encode()
    again = client.post(
        "/v1/certify", content=reordered, headers={**key, "Content-Type": "application/json"}
    )
    assert (again.status_code, again.json(), again.headers["Location"]) == (
        202,
        first.json(),
        first.headers["Location"],
    )
    assert (
        again.headers["Idempotent-Replayed"] == "true"
        and "Idempotent-Replayed" not in first.headers
    )

    other = client.post("/v1/certify", json={**job, "n": 60}, headers=key)
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["detail"]
    scoped = admin.post("/v1/certify", json=job, headers=key)  # keys are per API key
    assert scoped.status_code == 202 and scoped.json()["job_id"] != first.json()["job_id"]

    r0 = redis.Redis.from_url(redis_url)
    assert sorted(jobs_with_seed(r0, job["seed"])) == sorted(
        [first.json()["job_id"], scoped.json()["job_id"]]
    )
    assert wait_job(client, first.json()["job_id"])["status"] == "succeeded"
    assert (
        client.post("/v1/certify", json=job, headers=key).json() == first.json()
    )  # after it ran, too


def test_a_key_used_on_another_route_is_refused(admin, demo_model):
    key = {"Idempotency-Key": f"route-{seed()}"}
    job = admin.post(
        "/v1/certify", json={"model_id": demo_model["id"], "inputs": IMAGE, **TINY}, headers=key
    )
    assert job.status_code == 202, job.text
    train = admin.post("/v1/train", json={"dataset": "digits", "epochs": 1}, headers=key)
    assert train.status_code == 422 and "another body or route" in train.json()["detail"]


def test_multipart_repeat_matches_despite_other_boundaries(client, demo_model):
    form = {
        "model_id": demo_model["id"],
        "sigma": "0.25",
        "n0": "10",
        "n": "50",
        "seed": str(seed()),
    }
    key = {"Idempotency-Key": f"form-{form['seed']}"}
    data = npy(np.full((1, 1, 8, 8), 0.5))
    first = client.post("/v1/certify", data=form, files=[("inputs", ("x.npy", data))], headers=key)
    again = client.post("/v1/certify", data=form, files=[("inputs", ("x.npy", data))], headers=key)
    assert (
        first.request.headers["Content-Type"] != again.request.headers["Content-Type"]
    )  # boundaries
    assert (first.status_code, again.status_code) == (202, 202), first.text
    assert again.json() == first.json()
    changed = client.post(
        "/v1/certify",
        data=form,
        files=[("inputs", ("x.npy", npy(np.full((1, 1, 8, 8), 0.4))))],
        headers=key,
    )
    assert changed.status_code == 422 and "Idempotency-Key" in changed.json()["detail"]


def test_concurrent_requests_with_one_key_make_one_job(client, redis_url, demo_model):
    job = {"model_id": demo_model["id"], "inputs": IMAGE, **TINY, "seed": seed()}
    key = {"Idempotency-Key": f"race-{job['seed']}"}
    barrier, answers = threading.Barrier(8), []

    def post() -> None:
        barrier.wait()
        answers.append(client.post("/v1/certify", json=job, headers=key))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r.status_code for r in answers} <= {202, 409}, [r.text for r in answers]
    accepted = {r.json()["job_id"] for r in answers if r.status_code == 202}
    assert len(accepted) == 1
    assert all(int(r.headers["Retry-After"]) >= 1 for r in answers if r.status_code == 409)
    assert jobs_with_seed(redis.Redis.from_url(redis_url), job["seed"]) == list(accepted)


def test_a_key_in_progress_gets_409_then_the_answer(client, redis_url, demo_model):
    """A reservation held by another request (planted here) answers 409; released, the key works."""
    job = {"model_id": demo_model["id"], "inputs": IMAGE, **TINY, "seed": seed()}
    body, key = json.dumps(job).encode(), f"held-{job['seed']}"
    store = IdempotencyStore(redis.Redis.from_url(redis_url), ttl_s=60)
    record = store.key("default", key)  # the user key's account
    token, other = store.reserve(record, fingerprint("POST /v1/certify", json_content(body)))
    assert other is None
    headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
    held = client.post("/v1/certify", content=body, headers=headers)
    assert held.status_code == 409 and held.headers["Retry-After"] == "1", held.text
    assert client.post("/v1/certify", json={**job, "n": 70}, headers=headers).status_code == 422
    store.release(record, token)
    assert client.post("/v1/certify", content=body, headers=headers).status_code == 202


def test_dataset_upload_repeat_stores_one_dataset(client):
    name = f"idempotent-{seed()}"
    data = npz(x=np.zeros((2, 1, 8, 8)), y=[0, 1])
    answers = [
        client.post(
            "/v1/datasets",
            files={"file": ("two.npz", data)},
            data={"name": name},
            headers={"Idempotency-Key": name},
        )
        for _ in range(2)
    ]
    assert [r.status_code for r in answers] == [201, 201]
    assert answers[0].json() == answers[1].json()
    assert answers[1].headers["Location"] == f"/v1/datasets/{answers[0].json()['id']}"
    newest = client.get("/v1/datasets", params={"limit": 100}).json()["datasets"]
    assert [d["id"] for d in newest if d["name"] == name] == [answers[0].json()["id"]]


def test_a_malformed_key_is_refused(client, demo_model):
    resp = client.post(
        "/v1/certify",
        json={"model_id": demo_model["id"], "inputs": IMAGE, **TINY},
        headers={"Idempotency-Key": "x" * 256},
    )
    assert resp.status_code == 422
    assert "Idempotency-Key" in json.dumps(resp.json()["detail"])
