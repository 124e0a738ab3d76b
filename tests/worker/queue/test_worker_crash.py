"""A worker killed with SIGKILL mid-job loses nothing (real processes, real signals).

Its own Redis, API and workers (with a 3 s heartbeat TTL), since it kills workers.

* The whole worker (main process and pool, as when its host or container dies) is killed while a
  certify job runs and restarted under the same name (a restarted container keeps its
  hostname); it sends the job again as soon as the dead incarnation's heartbeat expires (not
  after the hours-long visibility timeout), and the job succeeds with exactly the rows an
  uninterrupted run gives for that seed.
* A job whose pool process is killed on every delivery ends ``failed`` after the redelivery cap,
  with a message that says why.
* A dead worker's job is sent again to the front of the queue: with 50 jobs queued behind it, it
  still finishes before nearly all of them.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import numpy as np
import pytest
import redis

from smoothcert.service.devstack.redis_server import RedisServer
from smoothcert.worker.queue.leases import LEASES_KEY
from tests.support.stack import (
    ADMIN_KEY,
    USER_KEY,
    stack_env,
    start_api,
    stop_process,
    wait_for,
    wait_job,
)
from tests.support.stack import (
    start_worker as start_stack_worker,
)

pytestmark = pytest.mark.process

CAP = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    server = RedisServer(tmp / "redis", persist=False).start()
    # 50 queued jobs from one key: above the default quota of active jobs per key
    env = stack_env(
        server.url,
        tmp / "data",
        SMOOTHCERT_WORKER_HEARTBEAT_TTL_S="3",
        SMOOTHCERT_MAX_DELIVERIES=str(CAP),
        SMOOTHCERT_MAX_ACTIVE_JOBS_PER_KEY="100",
    )
    api, url = start_api(env, tmp / "api.log")
    procs: list = [api]
    yield {
        "env": env,
        "url": url,
        "tmp": tmp,
        "redis": redis.Redis.from_url(server.url),
        "procs": procs,
    }
    for proc in procs:
        stop_process(proc)
    server.stop()


def start_worker(stack, name: str, log_name: str | None = None):
    log = stack["tmp"] / f"{log_name or name}.log"
    proc, _ = start_stack_worker(stack["env"], log, f"{name}@%h")
    stack["procs"].append(proc)
    return proc


def lease_of(stack, job_id: str) -> dict | None:
    raw = stack["redis"].hget(LEASES_KEY, job_id)
    return None if raw is None else json.loads(raw)


def deliveries(stack, job_id: str) -> int:
    return int(stack["redis"].hget(f"smoothcert:job:{job_id}", "deliveries") or 0)


@pytest.fixture(scope="module")
def setup(stack, demo_paths):
    """A first worker, the demo model uploaded, and a client."""
    stack["worker"] = start_worker(stack, "first")
    with open(demo_paths["safetensors"], "rb") as f:
        resp = httpx.post(
            f"{stack['url']}/v1/models",
            files={"file": ("digits.safetensors", f)},
            data={"name": "digits", "visibility": "public"},  # the user key certifies
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=90,
        )
    assert resp.status_code == 201, resp.text
    client = httpx.Client(
        base_url=stack["url"], headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60
    )
    yield {"client": client, "model_id": resp.json()["id"], "x": np.load(demo_paths["test_x"])[:4]}
    client.close()


def submit(setup, n: int, seed: int) -> str:
    resp = setup["client"].post(
        "/v1/certify",
        json={
            "model_id": setup["model_id"],
            "inputs": setup["x"].tolist(),
            "sigma": 0.25,
            "n0": 100,
            "n": n,
            "seed": seed,
            "batch_size": 500,
        },
    )
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


def test_whole_worker_killed_mid_job_is_sent_again_and_gives_the_same_rows(stack, setup):
    job_id = submit(setup, n=40_000, seed=20261125)
    client = setup["client"]
    wait_for(
        lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] > 0, 120, "progress"
    )
    lease = lease_of(stack, job_id)
    assert lease is not None and lease["worker"].startswith("first@")
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    os.killpg(stack["worker"].pid, signal.SIGKILL)  # the main process and its pool, as a dead host
    stack["worker"].wait()

    # Restarted under the same name, as a crashed container comes back with its hostname: the
    # new incarnation's heartbeat does not vouch for the dead one's lease.
    stack["worker"] = start_worker(stack, "first", log_name="first-restarted")
    record = wait_job(client, job_id, timeout=180)
    assert record["status"] == "succeeded", record["error"]
    assert deliveries(stack, job_id) == 2
    assert lease_of(stack, job_id) is None  # released when the second run ended

    # The same request and seed, run once without interruption.
    again = wait_job(client, submit(setup, n=40_000, seed=20261125), timeout=180)
    assert again["status"] == "succeeded", again["error"]
    assert without_timings(record["result"]["results"]) == without_timings(
        again["result"]["results"]
    )


def test_a_job_that_kills_its_worker_every_time_fails_after_the_cap(stack, setup):
    job_id = submit(setup, n=200_000, seed=7)
    client = setup["client"]
    for delivery in range(1, CAP + 1):
        wait_for(
            lambda: (
                deliveries(stack, job_id) == delivery and (lease_of(stack, job_id) or {}).get("pid")
            ),
            120,
            f"delivery {delivery}",
        )
        pid = lease_of(stack, job_id)["pid"]
        assert pid != stack["worker"].pid  # a pool process, not the worker's main process
        os.kill(pid, signal.SIGKILL)
    record = wait_job(client, job_id, timeout=120)
    assert record["status"] == "failed"
    assert record["error"] == f"the job was started {CAP} times and its worker died each time"
    assert deliveries(stack, job_id) == CAP + 1


def test_a_dead_workers_job_is_sent_again_ahead_of_the_backlog(stack, setup):
    client = setup["client"]
    job_id = submit(setup, n=40_000, seed=5)
    wait_for(
        lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] > 0, 120, "progress"
    )
    backlog = []
    for i in range(50):  # queued behind the running job: the worker holds one message at a time
        resp = client.post(
            "/v1/certify",
            json={
                "model_id": setup["model_id"],
                "inputs": setup["x"][:1].tolist(),
                "sigma": 0.25,
                "n0": 100,
                "n": 20_000,
                "seed": i,
            },
        )
        assert resp.status_code == 202, resp.text
        backlog.append(resp.json()["job_id"])
    assert lease_of(stack, job_id) is not None
    os.killpg(stack["worker"].pid, signal.SIGKILL)
    stack["worker"].wait()

    stack["worker"] = start_worker(stack, "after-kill")
    record = wait_job(client, job_id, timeout=300)
    assert record["status"] == "succeeded", record["error"]
    assert deliveries(stack, job_id) >= 2
    behind = [client.get(f"/v1/jobs/{b}").json() for b in backlog]
    done_first = [
        b
        for b in behind
        if b["finished_at"] is not None and b["finished_at"] < record["finished_at"]
    ]
    # At the back of the queue it would have waited for all 50; at the front it waits at most for
    # the job the new worker took before the dead lease was reaped.
    assert len(done_first) <= 5, (
        f"{len(done_first)} of the 50 queued jobs finished before the resent one"
    )
    for b in backlog:  # the rest is not needed
        client.delete(f"/v1/jobs/{b}")
    for b in backlog:
        assert wait_job(client, b, timeout=120)["status"] in ("succeeded", "canceled")


BACKLOG = 30


def test_a_killed_pool_processs_job_goes_back_ahead_of_the_backlog(stack, setup):
    """Celery puts the message of a task whose pool process died back at the front of the queue
    (kombu would put it at the back): it is the next one the worker takes, whatever is queued."""
    client = setup["client"]
    job_id = submit(setup, n=40_000, seed=6)
    wait_for(
        lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] > 0, 120, "progress"
    )
    backlog = []
    for i in range(BACKLOG):
        resp = client.post(
            "/v1/certify",
            json={
                "model_id": setup["model_id"],
                "inputs": setup["x"][:1].tolist(),
                "sigma": 0.25,
                "n0": 100,
                "n": 20_000,
                "seed": i,
            },
        )
        assert resp.status_code == 202, resp.text
        backlog.append(resp.json()["job_id"])
    pid = lease_of(stack, job_id)["pid"]
    assert pid != stack["worker"].pid
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    record = wait_job(client, job_id, timeout=300)
    took = time.monotonic() - killed
    assert record["status"] == "succeeded", record["error"]
    assert deliveries(stack, job_id) == 2
    behind = [client.get(f"/v1/jobs/{b}").json() for b in backlog]
    done_first = [
        b
        for b in behind
        if b["finished_at"] is not None and b["finished_at"] < record["finished_at"]
    ]
    print(
        f"pool process killed with {BACKLOG} jobs queued: the job finished {took:.1f} s later, "
        f"after {len(done_first)} of them"
    )
    assert done_first == [], (
        f"{len(done_first)} of the {BACKLOG} queued jobs finished before the resent one"
    )
    for b in backlog:
        client.delete(f"/v1/jobs/{b}")
    for b in backlog:
        assert wait_job(client, b, timeout=120)["status"] in ("succeeded", "canceled")
