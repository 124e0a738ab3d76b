"""A task past its time limit ends its job ``failed`` with a message, and releases its lease.

Celery raises SoftTimeLimitExceeded inside the task when the soft limit passes; that handler is
tested with the exception raised directly (database 8 of the session's server, away from the
session worker). A task that a model holds inside native code never sees that exception: on a
worker of its own, its pool process's watchdog ends it before the hard limit, and when even the
watchdog cannot act (the process is stopped), Celery's hard limit kills it and the worker's main
process fails the job and releases the lease.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from smoothcert.service.core.jobs import new_job_id
from smoothcert.worker.queue import runner
from smoothcert.worker.queue.leases import LEASES_KEY
from tests.support.hostile_stack import hostile_stack, submit
from tests.support.proc import alive
from tests.support.stack import (
    wait_for,
    wait_job,
    worker_context,
)


@pytest.fixture
def ctx(redis_url, tmp_path):
    with worker_context(redis_url, 8, tmp_path) as ctx:
        yield ctx


def test_a_job_past_its_soft_time_limit_fails_saying_so(ctx):
    jobs = ctx.jobs
    job_id = new_job_id()
    jobs.create(job_id, "certify", {})
    assert jobs.start(job_id) == 1

    def overrun():
        raise SoftTimeLimitExceeded()

    runner.record_errors(ctx, job_id, overrun)
    record = jobs.get(job_id)
    assert record.status == "failed"
    assert record.error == f"the job exceeded the {ctx.settings.task_time_limit_s} s time limit"
    assert jobs.start(job_id) == 0  # a failed job is never run again


# A task that its model holds inside native code past the time limit, on a worker of its own
# (database 4) with SMOOTHCERT_TASK_TIME_LIMIT_S = LIMIT_S and a batch floor far above it. Before,
# Celery's hard limit killed the process and the record stayed `running`, error null, lease held.
LIMIT_S = (
    20  # the next job runs in a fresh pool process, which takes seconds to start on a busy machine
)


@pytest.fixture(scope="module")
def limited(redis_url, tmp_path_factory, demo_paths):
    with hostile_stack(
        redis_url,
        4,
        tmp_path_factory.mktemp("time-limit"),
        demo_paths,
        "limited@%h",
        SMOOTHCERT_TASK_TIME_LIMIT_S=str(LIMIT_S),
        SMOOTHCERT_BATCH_DEADLINE_FLOOR_S="600",
    ) as stack:
        yield stack


def _running_pid(limited, job_id: str) -> int:
    """The pool process running ``job_id``, once the job is running."""

    def pid():
        raw = limited["redis"].hget(LEASES_KEY, job_id)
        record = limited["user"].get(f"/v1/jobs/{job_id}").json()
        return json.loads(raw)["pid"] if raw and record["status"] == "running" else None

    return wait_for(pid, 60, f"job {job_id} to run")


def _ends_and_the_worker_goes_on(limited, job_id: str, pid: int, how: str) -> None:
    record = wait_job(limited["user"], job_id, timeout=LIMIT_S + 60)
    assert record["status"] == "failed"
    assert record["error"] == (
        f"the job exceeded the {LIMIT_S} s time limit (SMOOTHCERT_TASK_TIME_LIMIT_S); "
        f"its worker process was {how}"
    )
    wait_for(lambda: limited["redis"].hget(LEASES_KEY, job_id) is None, 60, "the lease to go")
    wait_for(lambda: not alive(pid), 30, "the stuck pool process to exit")
    assert limited["worker"].poll() is None
    good = wait_job(limited["user"], submit(limited, "good", 0.25), timeout=120)
    assert good["status"] == "succeeded", good["error"]


def test_a_task_stuck_in_its_model_at_the_time_limit_fails_and_releases_its_lease(limited):
    job_id = submit(limited, "hostile", 1.0)
    pid = _running_pid(limited, job_id)
    # the watchdog's end, before Celery's hard limit: the process is replaced
    _ends_and_the_worker_goes_on(limited, job_id, pid, "replaced")


def test_a_task_killed_by_the_hard_time_limit_fails_and_releases_its_lease(limited):
    job_id = submit(limited, "hostile", 1.0)
    pid = _running_pid(limited, job_id)
    os.kill(pid, signal.SIGSTOP)  # not even its watchdog runs: Celery's hard limit kills it
    _ends_and_the_worker_goes_on(limited, job_id, pid, "killed")
