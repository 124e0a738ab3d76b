"""A model that spins on a certification's noisy copies cannot wedge a worker.

The model (:func:`~tests.support.hostile_models.loop_on_noise_onnx`) passes the upload check and
then runs an ONNX Loop of 2^62 iterations on the first batch of a job whose noise puts a pixel
above 2.5, inside onnxruntime, where the engine's cancel check between batches never comes. Before
the watchdog, such a job stayed ``running`` for good, its worker served nothing else, ``DELETE``
answered 202 and changed nothing, and ``/readyz`` said ready. Now each pool process's watchdog
(:mod:`smoothcert.worker.queue.watchdog`) ends the job past the batch limit, or within seconds of
a ``DELETE``, releases the lease and has the process replaced; ``/readyz`` names a process stuck
past that limit (here one stopped with SIGSTOP, so its watchdog cannot act). A worker of its own,
with a batch floor of FLOOR_S, on database 13 of the session's Redis. Its log, last, is JSON on
every line, with what Celery, billiard and onnxruntime print past Python's logging.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import redis

from smoothcert.service.core.workers import PROCESSES_PREFIX
from smoothcert.worker.queue.leases import LEASES_KEY
from tests.support.hostile_models import unused_initializer_onnx
from tests.support.hostile_stack import hostile_stack, submit
from tests.support.proc import alive
from tests.support.stack import (
    stop_process,
    upload_model_file,
    wait_for,
    wait_job,
)

FLOOR_S = 6


@pytest.fixture(scope="module")
def stack(redis_url, tmp_path_factory, demo_paths):
    with hostile_stack(
        redis_url,
        13,
        tmp_path_factory.mktemp("watchdog"),
        demo_paths,
        "watchdog@%h",
        SMOOTHCERT_BATCH_DEADLINE_FLOOR_S=str(FLOOR_S),
    ) as stack:
        yield stack


def lease(client: redis.Redis, job_id: str) -> dict | None:
    raw = client.hget(LEASES_KEY, job_id)
    return None if raw is None else json.loads(raw)


def stuck_in_first_batch(stack, job_id: str) -> int:
    """Wait until the job runs its first batch and the watchdog reported it slow; the pool pid."""

    def reported():
        entries = [
            json.loads(v) for v in stack["redis"].hgetall(PROCESSES_PREFIX + stack["name"]).values()
        ]
        return [e["pid"] for e in entries if (e.get("batch") or {}).get("job_id") == job_id]

    [pid] = wait_for(reported, 60, "the report of a slow batch")
    record = stack["user"].get(f"/v1/jobs/{job_id}").json()
    assert (
        record["status"] == "running" and record["progress"]["done"] == 0
    )  # inside its first batch
    assert lease(stack["redis"], job_id)["pid"] == pid
    return pid


def released(stack, job_id: str) -> None:
    """The lease goes (the watchdog releases it just after recording the job's end; the message's
    next delivery, which drops it, holds one for a moment)."""
    wait_for(lambda: lease(stack["redis"], job_id) is None, 60, "the lease of the ended job to go")


def serves_the_next_job(stack, old_pid: int) -> None:
    wait_for(lambda: not alive(old_pid), 30, "the pool process that ran the hostile batch to exit")
    assert stack["worker"].poll() is None
    record = wait_job(stack["user"], submit(stack, "good", 0.25), timeout=120)
    assert record["status"] == "succeeded", record["error"]


def test_a_batch_past_its_watchdog_fails_the_job_and_the_worker_serves_the_next(stack):
    job_id = submit(stack, "hostile", 1.0)
    pid = stuck_in_first_batch(stack, job_id)
    record = wait_job(stack["user"], job_id, timeout=FLOOR_S + 60)
    assert record["status"] == "failed"
    assert record["error"].startswith(
        f"a batch of the model ran longer than {FLOOR_S} s, the limit for this job"
    )
    assert f"SMOOTHCERT_BATCH_DEADLINE_FLOOR_S ({FLOOR_S} s)" in record["error"]
    assert "SMOOTHCERT_BATCH_DEADLINE_FACTOR (10)" in record["error"]
    released(stack, job_id)
    serves_the_next_job(stack, pid)


def test_delete_of_a_job_stuck_in_a_batch_ends_it_within_seconds(stack):
    job_id = submit(stack, "hostile", 1.0)
    pid = stuck_in_first_batch(stack, job_id)
    asked = time.monotonic()
    assert stack["user"].delete(f"/v1/jobs/{job_id}").status_code == 202
    record = wait_job(stack["user"], job_id, timeout=FLOOR_S + 60)
    took = time.monotonic() - asked
    print(f"DELETE of a job stuck in a batch: canceled {took:.1f} s later")
    assert record["status"] == "canceled", (
        f"{record['status']} after {took:.1f} s: {record['error']}"
    )
    released(stack, job_id)
    serves_the_next_job(stack, pid)


def test_readyz_names_a_process_stuck_past_its_watchdog(stack):
    job_id = submit(stack, "hostile", 1.0)
    pid = stuck_in_first_batch(stack, job_id)
    os.kill(pid, signal.SIGSTOP)  # its watchdog cannot act now; the worker's main process beats on
    try:

        def not_ready():
            resp = stack["admin"].get("/readyz")
            return resp if resp.status_code == 503 else None

        resp = wait_for(not_ready, FLOOR_S + 30, "/readyz to notice the stuck process")
        detail = resp.json()["detail"]
        assert detail.startswith("no worker can take work: ")
        assert f"pool process {pid} has been inside one batch of job {job_id}" in detail
        assert f"past its watchdog's limit of {FLOOR_S} s" in detail
        anonymous = stack["anonymous"].get("/readyz")
        assert anonymous.status_code == 503
        assert anonymous.json() == {
            "status": "not ready",
            "detail": "no worker can take work: every worker is stuck or stopped answering",
        }
    finally:
        os.kill(pid, signal.SIGCONT)
    # Woken, its watchdog ends the job at once, and the worker is ready again.
    record = wait_job(stack["user"], job_id, timeout=60)
    assert record["status"] == "failed" and record["error"].startswith(
        "a batch of the model ran longer than"
    )
    serves_the_next_job(stack, pid)
    # The exited process's entry goes at the worker's next heartbeat (every TTL/5), which can come
    # after a quick next job has already finished.
    wait_for(
        lambda: stack["admin"].get("/readyz").status_code == 200, 30, "/readyz to be ready again"
    )


def test_readyz_notices_a_worker_whose_heartbeat_went_stale(stack):
    """The worker's main process stopped (SIGSTOP): its heartbeat key lives on for up to its TTL
    (10 s), but /readyz says not ready once the last beat is older than two beats."""
    main = stack["worker"].pid
    os.kill(main, signal.SIGSTOP)
    try:
        resp = wait_for(
            lambda: (r := stack["admin"].get("/readyz")).status_code == 503 and r,
            30,
            "/readyz to notice the stopped worker",
        )
        # the first 503 comes while the key still lives (stale after ~5 s, expired after 10 s)
        detail = resp.json()["detail"]
        assert detail.startswith(
            f"no worker can take work: worker {stack['name']} stopped answering: "
            "its last heartbeat is "
        ), detail
    finally:
        os.kill(main, signal.SIGCONT)
    wait_for(
        lambda: stack["admin"].get("/readyz").status_code == 200, 60, "/readyz to be ready again"
    )


def test_every_line_of_the_workers_output_is_json(stack):
    """After the jobs above (pool processes that exited under the watchdog), a model onnxruntime
    warns about in C++, and a warm shutdown; as root, Celery's SecurityWarning as well."""
    warned = upload_model_file(
        stack["admin"], unused_initializer_onnx(stack["tmp"] / "unused.onnx"), name="unused"
    )
    assert warned.status_code == 201, warned.text
    stop_process(stack["worker"])
    assert stack["worker"].returncode == 0
    lines = (stack["tmp"] / "worker.log").read_text().splitlines()  # its stdout and stderr
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"line {number} of the worker's output is not JSON: {line!r}")
    assert all(
        isinstance(r, dict) and {"time", "level", "logger", "message", "role"} <= r.keys()
        for r in records
    )
    messages = [r["message"] for r in records]
    assert any("Removing initializer 'unused'" in m for m in messages)  # onnxruntime, fd 2
    assert any("exited with 'exitcode 70'" in m for m in messages)  # billiard
    assert any("Warm shutdown" in m for m in messages)  # Celery
    if os.geteuid() == 0:
        assert any("SecurityWarning" in m for m in messages)
