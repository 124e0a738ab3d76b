"""A task past its soft time limit ends its job ``failed`` with a message (the handler, on a real Redis).

Celery raises SoftTimeLimitExceeded inside the task when the soft limit passes; the smallest
limit the settings allow (60 s) is too long for the suite, so the exception is raised directly.
Database 8 of the session's server, away from the session worker.
"""
from __future__ import annotations

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from smoothcert.service.core.jobs import JobStore, new_job_id
from smoothcert.worker.queue import runner
from tests.support.stack import scratch_db


@pytest.fixture
def jobs(redis_url):
    with scratch_db(redis_url, 8) as client:
        yield JobStore(client, ttl_s=600)


def test_a_job_past_its_soft_time_limit_fails_saying_so(jobs):
    job_id = new_job_id()
    jobs.create(job_id, "certify", {})
    assert jobs.start(job_id) == 1

    def overrun():
        raise SoftTimeLimitExceeded()

    runner.record_errors(job_id, jobs, overrun)
    record = jobs.get(job_id)
    assert record.status == "failed"
    assert record.error == f"the job exceeded the {runner.settings.task_time_limit_s} s time limit"
    assert jobs.start(job_id) == 0  # a failed job is never run again
