"""Redis with Sentinel: kill -9 of the primary under the API and two workers loses nothing.

A primary, a replica and three sentinels on loopback ports (tests/cluster/sentinels.py), the API
and two Celery workers configured with SMOOTHCERT_REDIS_SENTINELS only. The primary is killed (a)
with jobs waiting in the queue, (b) while a job runs and (c) while a client submits jobs and
datasets. Each time: every job that got a 202 succeeds with the rows of an undisturbed run of its
seed, every 201 dataset is still there, the clients see only 202, 201, 200 and 503 with
Retry-After, and the killed server comes back as the new primary's replica before the next kill.
The times measured (kill to the first 202 after it, kill to every job done) are printed as
``failover figure`` lines; docs/scaling.md quotes them.

Deterministic but for timing: the rows of a seed are a fixed computation, and what is asserted of
the timings is only that they end within generous bounds.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from smoothcert.service.core.jobs import JobStore
from smoothcert.service.core.queue import TRAIN_QUEUE, TRAIN_TASK, make_celery, send_first
from smoothcert.service.core.redis_client import connect
from smoothcert.service.core.settings import Settings
from smoothcert.service.core.workers import HEARTBEAT_PREFIX
from smoothcert.service.devstack.commands import worker_command
from smoothcert.service.devstack.redis_server import free_port
from smoothcert.service.devstack.stack import Stack
from tests.cluster.sentinels import (
    MASTER_NAME,
    PASSWORD,
    SENTINEL_PASSWORD,
    Deployment,
    Server,
)
from tests.support.stack import (
    ADMIN_KEY,
    USER_KEY,
    stack_env,
    start_api,
    start_process,
    stop_process,
    upload_model_file,
    wait_for,
)

pytestmark = pytest.mark.process

SMALL = {"sigma": 0.25, "n0": 20, "n": 2000}  # a fraction of a second per job
SEEDS = range(1, 7)
# The job (b) kills the primary under: 8 inputs x 40,000 samples, a few seconds of drawing here.
LONG = {"sigma": 0.25, "n0": 20, "n": 40_000, "seed": 99}
ANSWERS = {200, 201, 202, 503}
JOB_DONE_S = 120  # generous: two workers on two shared cores
FAILOVER_S = 60  # a failover takes about 2 s here; far past it the test fails, never hangs


@dataclass
class Cluster:
    deployment: Deployment
    url: str
    user: httpx.Client
    model_id: str
    x: np.ndarray
    reference: dict[int, list[dict]]  # seed -> rows of an undisturbed run
    data: Path  # the data volume the API and the workers share


def _settings(deployment: Deployment) -> dict[str, str]:
    return {
        "SMOOTHCERT_REDIS_URL": "",
        "SMOOTHCERT_REDIS_SENTINELS": deployment.sentinels_setting,
        "SMOOTHCERT_REDIS_MASTER_NAME": MASTER_NAME,
        "SMOOTHCERT_REDIS_PASSWORD": PASSWORD,
        "SMOOTHCERT_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
        "SMOOTHCERT_MAX_ACTIVE_JOBS_PER_KEY": "1000",
        # a heartbeat outlives a failover (about 2 s here), so no lease looks dead meanwhile
        "SMOOTHCERT_WORKER_HEARTBEAT_TTL_S": "10",
    }


def _start_worker(env: dict[str, str], log: Path, name: str) -> subprocess.Popen:
    proc = start_process(
        worker_command(
            "--concurrency", "1", "--hostname", name, "--without-mingle", "--without-gossip"
        ),
        env,
        log,
    )
    settings = Settings(
        redis_sentinels=env["SMOOTHCERT_REDIS_SENTINELS"],
        redis_password=PASSWORD,
        redis_sentinel_password=SENTINEL_PASSWORD,
    )
    client = connect(settings)
    try:
        wait_for(lambda: client.exists(HEARTBEAT_PREFIX + name), 60, f"worker {name}", proc, log)
    finally:
        client.close()
    return proc


def rows(record: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in record["result"]["results"]]


def body(cluster: Cluster, seed: int, **params) -> dict:
    return {
        "model_id": cluster.model_id,
        "inputs": cluster.x[:2].tolist(),
        **SMALL,
        "seed": seed,
        **params,
    }


def get(client: httpx.Client, path: str) -> httpx.Response:
    """A GET that the failover may answer 503 (with Retry-After), tried until it is not."""
    deadline = time.monotonic() + FAILOVER_S
    while time.monotonic() < deadline:
        resp = client.get(path)
        assert resp.status_code in ANSWERS, resp.text
        if resp.status_code != 503:
            return resp
        assert int(resp.headers["retry-after"]) >= 1
        time.sleep(0.1)
    pytest.fail(f"GET {path}: still 503 after {FAILOVER_S} s")


def wait_done(cluster: Cluster, job_ids: list[str], timeout: float = JOB_DONE_S) -> dict[str, dict]:
    deadline, done = time.monotonic() + timeout, {}
    while time.monotonic() < deadline and len(done) < len(job_ids):
        for job_id in job_ids:
            if job_id not in done:
                record = get(cluster.user, f"/v1/jobs/{job_id}").json()
                if record["status"] in ("succeeded", "failed", "canceled"):
                    done[job_id] = record
        time.sleep(0.1)
    assert len(done) == len(job_ids), f"{len(job_ids) - len(done)} jobs still not done"
    return done


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, demo_paths) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("sentinel-cluster")
    deployment = Deployment(tmp / "redis").start()
    env = stack_env("", tmp / "data", **_settings(deployment))
    procs: list[subprocess.Popen] = []
    try:
        api, url = start_api(env, tmp / "api.log")
        procs.append(api)
        for name in ("one@cluster", "two@cluster"):
            procs.append(_start_worker(env, tmp / f"worker-{name[:3]}.log", name))
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=90
        ) as admin:
            resp = upload_model_file(
                admin, demo_paths["safetensors"], name="digits", visibility="public"
            )
        assert resp.status_code == 201, resp.text
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=30
        ) as user:
            cluster = Cluster(
                deployment,
                url,
                user,
                resp.json()["id"],
                np.load(demo_paths["test_x"]),
                {},
                tmp / "data",
            )
            # The undisturbed runs every later job is compared with.
            ids = {seed: submit(cluster, body(cluster, seed)) for seed in SEEDS}
            long_id = submit(cluster, body(cluster, **LONG, inputs=cluster.x[:8].tolist()))
            done = wait_done(cluster, [*ids.values(), long_id])
            assert all(r["status"] == "succeeded" for r in done.values()), done
            cluster.reference = {seed: rows(done[i]) for seed, i in ids.items()}
            cluster.reference[LONG["seed"]] = rows(done[long_id])
            yield cluster
            assert get(user, f"/v1/models/{cluster.model_id}").status_code == 200
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        deployment.stop()


def submit(cluster: Cluster, payload: dict) -> str:
    resp = cluster.user.post("/v1/certify", json=payload)
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]


def check_rows(cluster: Cluster, records: dict[str, dict], seeds: dict[str, int]) -> None:
    for job_id, record in records.items():
        assert record["status"] == "succeeded", (job_id, record.get("error"))
        assert rows(record) == cluster.reference[seeds[job_id]], job_id


def fail_over(cluster: Cluster) -> tuple[Server, float]:
    """kill -9 of the primary; the server killed and when (monotonic)."""
    killed_at = time.monotonic()
    return cluster.deployment.kill_primary(), killed_at


def first_submission_after(cluster: Cluster, killed_at: float, seed: int) -> tuple[str, float]:
    """Submit until a 202 (503s with Retry-After meanwhile); the job and seconds since the kill."""
    while time.monotonic() < killed_at + FAILOVER_S:
        resp = cluster.user.post("/v1/certify", json=body(cluster, seed))
        assert resp.status_code in (202, 503), resp.text
        if resp.status_code == 202:
            return resp.json()["job_id"], time.monotonic() - killed_at
        assert int(resp.headers["retry-after"]) >= 1
        time.sleep(0.05)
    pytest.fail(f"no 202 within {FAILOVER_S} s of the kill")


def test_a_failover_with_jobs_queued_loses_none(cluster):
    seeds = {submit(cluster, body(cluster, seed)): seed for seed in SEEDS for _ in range(2)}
    old, killed_at = fail_over(cluster)  # most of the 12 are still waiting in the queue
    new_id, first_s = first_submission_after(cluster, killed_at, 1)
    seeds[new_id] = 1
    done = wait_done(cluster, list(seeds))
    done_s = time.monotonic() - killed_at
    check_rows(cluster, done, seeds)
    print(f"failover figure (a) queued: first 202 {first_s:.1f} s, 13 jobs done {done_s:.1f} s")
    assert cluster.deployment.primary() is not old
    cluster.deployment.restart_as_replica(old)


def test_a_failover_while_a_job_runs_finishes_it_once_with_its_rows(cluster):
    job_id = submit(cluster, body(cluster, **LONG, inputs=cluster.x[:8].tolist()))
    while True:
        record = get(cluster.user, f"/v1/jobs/{job_id}").json()
        if record["status"] == "running" and record["progress"]["done"] > 0:
            break
        assert record["status"] in ("queued", "running"), record
        time.sleep(0.05)
    old, killed_at = fail_over(cluster)
    done = wait_done(cluster, [job_id])
    done_s = time.monotonic() - killed_at
    check_rows(cluster, done, {job_id: LONG["seed"]})
    client = connect(
        Settings(
            redis_sentinels=cluster.deployment.sentinels_setting,
            redis_password=PASSWORD,
            redis_sentinel_password=SENTINEL_PASSWORD,
        )
    )
    try:
        # run once: the delivery that was running finished it (a redelivered copy found it done)
        assert client.hget(JobStore.key(job_id), "deliveries") == b"1"
    finally:
        client.close()
    print(f"failover figure (b) running: the job done {done_s:.1f} s after the kill")
    cluster.deployment.restart_as_replica(old)


def test_a_failover_while_clients_submit_acknowledges_only_what_survives(cluster):
    # (when, what, status, the new record's id, Retry-After)
    answers: list[tuple[float, str, int, str | None, str | None]] = []
    stop = threading.Event()
    x, y = cluster.x[:4], np.arange(4) % 10

    def client_loop() -> None:
        with httpx.Client(
            base_url=cluster.url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=30
        ) as c:
            i = 0
            while not stop.is_set():
                i += 1
                if i % 5 == 0:
                    buf = io.BytesIO()
                    np.savez(buf, x=x, y=y)
                    resp = c.post("/v1/datasets", files={"file": ("d.npz", buf.getvalue())})
                    what = "dataset"
                else:
                    key = str(uuid.uuid4())
                    resp = c.post(
                        "/v1/certify",
                        json=body(cluster, SEEDS[i % len(SEEDS)]),
                        headers={"Idempotency-Key": key},
                    )
                    what = f"job:{SEEDS[i % len(SEEDS)]}"
                ok = resp.status_code in (201, 202)
                answers.append(
                    (
                        time.monotonic(),
                        what,
                        resp.status_code,
                        (resp.json().get("job_id") or resp.json().get("id")) if ok else None,
                        resp.headers.get("retry-after"),
                    )
                )
                time.sleep(0.1)

    thread = threading.Thread(target=client_loop, daemon=True)
    thread.start()
    time.sleep(1.5)
    old, killed_at = fail_over(cluster)
    try:
        Deployment.wait(
            lambda: any(t > killed_at and s == 202 for t, _, s, _, _ in answers), 60, "a 202"
        )
        time.sleep(1.5)
    finally:
        stop.set()
        thread.join(30)
    statuses = {s for _, _, s, _, _ in answers}
    assert statuses <= {201, 202, 503}, statuses
    assert 503 in statuses  # the kill was seen: submissions during the failover were refused
    assert all(int(r or 0) >= 1 for _, _, s, _, r in answers if s == 503), answers
    first_s = min(t for t, _, s, _, _ in answers if t > killed_at and s == 202) - killed_at
    seeds = {i: int(w.split(":")[1]) for _, w, s, i, _ in answers if s == 202 and i}
    datasets = [i for _, w, s, i, _ in answers if w == "dataset" and s == 201 and i]
    assert datasets and len(seeds) >= 10
    done = wait_done(cluster, list(seeds))
    done_s = time.monotonic() - killed_at
    check_rows(cluster, done, seeds)
    for dataset_id in datasets:  # every dataset acknowledged with a 201 is still there
        assert get(cluster.user, f"/v1/datasets/{dataset_id}").status_code == 200
    refused = sum(1 for _, _, s, _, _ in answers if s == 503)
    print(
        f"failover figure (c) submitting: first 202 {first_s:.1f} s after the kill, "
        f"{refused} of {len(answers)} requests 503, {len(seeds)} jobs done {done_s:.1f} s"
    )
    cluster.deployment.restart_as_replica(old)


def test_a_change_no_replica_confirms_is_503_and_its_retry_gets_the_same_job(cluster):
    primary = cluster.deployment.primary()
    [replica] = [s for s in cluster.deployment.servers if s is not primary]
    key = str(uuid.uuid4())
    replica.process.send_signal(signal.SIGSTOP)  # connected, but acknowledges nothing
    try:
        started = time.monotonic()
        resp = cluster.user.post(
            "/v1/certify", json=body(cluster, 4), headers={"Idempotency-Key": key}
        )
        waited = time.monotonic() - started
    finally:
        replica.process.send_signal(signal.SIGCONT)
    assert resp.status_code == 503 and resp.headers["retry-after"] == "5", resp.text
    assert "could not be confirmed on a Redis replica" in resp.json()["detail"]
    assert waited >= 1.0  # SMOOTHCERT_REDIS_WAIT_TIMEOUT_MS, the default 1000
    again = cluster.user.post(
        "/v1/certify", json=body(cluster, 4), headers={"Idempotency-Key": key}
    )
    assert again.status_code == 202, again.text  # the job the first request wrote, not a second
    job_id = again.json()["job_id"]
    check_rows(cluster, wait_done(cluster, [job_id]), {job_id: 4})


def test_every_client_of_the_service_follows_the_sentinels(cluster):
    """After three failovers the API, both workers and Celery all use the third primary."""
    primary = cluster.deployment.primary().client()
    names = {k.decode() for k in primary.scan_iter(match=HEARTBEAT_PREFIX + "*")}
    assert names == {HEARTBEAT_PREFIX + "one@cluster", HEARTBEAT_PREFIX + "two@cluster"}
    job_id = submit(cluster, body(cluster, 3))
    check_rows(cluster, wait_done(cluster, [job_id]), {job_id: 3})
    assert primary.hexists(JobStore.key(job_id), "status")  # recorded on the third primary
    # A dead worker's task is sent again, to the front of its queue, through the sentinels too
    # (the heartbeat thread's send_first); to `train`, which no worker here consumes.
    app = make_celery(
        Settings(
            redis_sentinels=cluster.deployment.sentinels_setting,
            redis_password=PASSWORD,
            redis_sentinel_password=SENTINEL_PASSWORD,
        )
    )
    send_first(app, TRAIN_TASK, ["job-that-is-not"], "sent-again")
    [message] = primary.lrange(TRAIN_QUEUE, 0, -1)
    assert json.loads(message)["headers"]["id"] == "sent-again"
    primary.delete(TRAIN_QUEUE)


def test_smoothcert_up_runs_on_the_sentinels_without_a_redis_of_its_own(cluster, monkeypatch):
    for name in [k for k in os.environ if k.startswith("SMOOTHCERT_")]:
        monkeypatch.delenv(name)  # the children get what the settings say, nothing inherited
    settings = Settings(
        redis_sentinels=cluster.deployment.sentinels_setting,
        redis_password=PASSWORD,
        redis_sentinel_password=SENTINEL_PASSWORD,
        data_dir=cluster.data,  # the model is there, and the job's inputs must be
        port=free_port(),
        api_key=USER_KEY,
        admin_key=ADMIN_KEY,
        device="cpu",
    )
    stack = Stack(settings)
    try:
        stack.start()
        assert stack.redis is None
        stack.wait_ready(90)  # /readyz: the API of `up` reads the primary
        primary = cluster.deployment.primary().client()
        ours = HEARTBEAT_PREFIX + f"smoothcert-{os.getpid()}@*"
        # the worker of `up` beats on the primary
        Deployment.wait(lambda: list(primary.scan_iter(match=ours)), 60, "the worker of `up`")
        resp = httpx.post(
            f"{stack.url}/v1/certify",
            headers={"Authorization": f"Bearer {USER_KEY}"},
            json=body(cluster, 2),
            timeout=30,
        )
        assert resp.status_code == 202, resp.text
    finally:
        stack.stop()
    # Its job went through the same primary: the cluster's API and workers see and run it.
    job_id = resp.json()["job_id"]
    check_rows(cluster, wait_done(cluster, [job_id]), {job_id: 2})
