"""Redis dies and comes back (from its append-only file) between submitting and polling: nothing is lost.
Then it dies under a running worker and API: both answer again once it is back. And it dies while a
worker is inside a task: the task goes on and its job ends as if nothing had happened.

Its own Redis, worker and API, since it stops Redis under them.
"""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
import redis

from smoothcert.service.core.jobs import JobStore
from smoothcert.service.devstack.redis_server import RedisServer
from smoothcert.worker.queue.leases import LEASES_KEY
from tests.support.stack import (
    ADMIN_KEY,
    USER_KEY,
    stack_env,
    start_api,
    start_worker,
    stop_process,
    wait_for,
    wait_job,
)

pytestmark = pytest.mark.process


def _start_worker(env, log):
    return start_worker(env, log, "restart@%h")[0]


def test_job_survives_a_killed_redis_and_the_api_answers_503_meanwhile(tmp_path, demo_paths):
    server = RedisServer(tmp_path / "redis", persist=True).start()
    env = stack_env(server.url, tmp_path / "data")
    api, url = start_api(env, tmp_path / "api.log")
    worker = _start_worker(env, tmp_path / "worker.log")
    try:
        user = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60
        )
        with open(demo_paths["safetensors"], "rb") as f:
            resp = httpx.post(
                f"{url}/v1/models",
                files={"file": ("digits.safetensors", f)},
                data={"name": "d", "visibility": "public"},  # the user key certifies
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                timeout=90,
            )
        assert resp.status_code == 201, resp.text
        model_id = resp.json()["id"]
        stop_process(worker)  # the job must wait in the queue while Redis goes away
        x = np.load(demo_paths["test_x"])[:2]
        resp = user.post(
            "/v1/certify",
            json={
                "model_id": model_id,
                "inputs": x.tolist(),
                "sigma": 0.25,
                "n0": 20,
                "n": 200,
                "seed": 1,
            },
        )
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["job_id"]

        time.sleep(1.5)  # the append-only file is fsynced every second
        server.process.kill()  # SIGKILL: no snapshot on the way out, only the append-only file remains
        server.process.wait()
        server.process = None
        down = user.get(f"/v1/jobs/{job_id}")
        assert down.status_code == 503 and "unreachable" in down.json()["detail"]

        server = RedisServer(
            tmp_path / "redis", port=server.port, persist=True, password=server.password
        ).start()
        assert user.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        worker = _start_worker(env, tmp_path / "worker2.log")
        record = wait_job(user, job_id, timeout=90)
        assert record["status"] == "succeeded", record["error"]
        assert len(record["result"]["results"]) == 2

        # Redis goes away under a running worker and the API, and comes back: both reconnect.
        server.process.kill()
        server.process.wait()
        server.process = None
        assert user.get(f"/v1/jobs/{job_id}").status_code == 503
        assert httpx.get(f"{url}/readyz").status_code == 503
        server = RedisServer(
            tmp_path / "redis", port=server.port, persist=True, password=server.password
        ).start()
        wait_for(
            lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "readyz after the restart"
        )
        resp = user.post(
            "/v1/certify",
            json={
                "model_id": model_id,
                "inputs": x.tolist(),
                "sigma": 0.25,
                "n0": 20,
                "n": 200,
                "seed": 1,
            },
        )
        assert resp.status_code == 202, resp.text
        after = wait_job(user, resp.json()["job_id"], timeout=90)
        assert after["status"] == "succeeded", after["error"]
        rows = lambda r: [
            {k: v for k, v in row.items() if k != "elapsed_s"} for row in r["result"]["results"]
        ]  # noqa: E731
        assert rows(after) == rows(record)  # same seed, same rows
        assert worker.poll() is None  # the same worker process ran it
    finally:
        stop_process(worker)
        stop_process(api)
        server.stop()


def _kill(server: RedisServer) -> None:
    server.process.kill()  # SIGKILL: no snapshot on the way out, only the append-only file remains
    server.process.wait()
    server.process = None


def test_a_task_running_through_a_redis_restart_finishes_with_the_rows_of_an_uninterrupted_run(
    tmp_path, demo_paths
):
    server = RedisServer(tmp_path / "redis", persist=True).start()
    env = stack_env(server.url, tmp_path / "data")
    api, url = start_api(env, tmp_path / "api.log")
    log = tmp_path / "worker.log"
    worker = _start_worker(env, log)
    try:
        user = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60
        )
        with open(demo_paths["safetensors"], "rb") as f:
            resp = httpx.post(
                f"{url}/v1/models",
                files={"file": ("digits.safetensors", f)},
                data={"name": "d", "visibility": "public"},  # the user key certifies
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                timeout=90,
            )
        assert resp.status_code == 201, resp.text
        body = {
            "model_id": resp.json()["id"],
            "inputs": np.load(demo_paths["test_x"])[:8].tolist(),
            "sigma": 0.25,
            "n0": 20,
            # 800,000 samples, ~6 s of drawing here (about 140,000/s once the runtime is chosen):
            # still drawing at the kill, 1.5 s after the first progress (20,000 ended before it)
            "n": 100_000,
            "seed": 5,
        }
        resp = user.post("/v1/certify", json=body)
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["job_id"]
        running = wait_job(
            user, job_id, timeout=120, until={"running", "succeeded", "failed", "canceled"}
        )
        while running["status"] == "running" and running["progress"]["done"] == 0:
            running = user.get(f"/v1/jobs/{job_id}").json()
        assert running["status"] == "running", running
        time.sleep(1.5)  # the append-only file is fsynced every second: the running record is in it

        _kill(server)
        time.sleep(4)  # the task's progress writes and cancel checks meet a dead Redis meanwhile
        server = RedisServer(
            tmp_path / "redis", port=server.port, persist=True, password=server.password
        ).start()
        wait_for(
            lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "readyz after the restart"
        )
        record = wait_job(user, job_id, timeout=300)
        assert record["status"] == "succeeded", record["error"]
        client = redis.Redis.from_url(server.url)
        try:
            # The task outlived the outage: the delivery that was running finished the job (its
            # success may be recorded before /readyz answers again, so no status is read here).
            assert client.hget(JobStore.key(job_id), "deliveries") == b"1"
            wait_for(lambda: client.hlen(LEASES_KEY) == 0, 60, "the lease released", worker, log)
        finally:
            client.close()
        warnings = [
            line
            for line in map(json.loads, log.read_text().splitlines())
            if line["level"] == "WARNING" and line["message"].startswith("Redis is unreachable")
        ]
        assert warnings and all(w.get("job_id") == job_id for w in warnings), warnings

        resp = user.post(
            "/v1/certify", json=body
        )  # the same worker serves the next job: same seed, same rows
        assert resp.status_code == 202, resp.text
        again = wait_job(user, resp.json()["job_id"], timeout=300)
        assert again["status"] == "succeeded", again["error"]
        rows = lambda r: [
            {k: v for k, v in row.items() if k != "elapsed_s"} for row in r["result"]["results"]
        ]  # noqa: E731
        assert len(rows(record)) == 8 and rows(record) == rows(again)
        assert worker.poll() is None
    finally:
        stop_process(worker)
        stop_process(api)
        server.stop()
