"""Riding out a Redis outage inside a task (worker/queue/outage.py), on a worker context whose
Redis is a real server that is away, then started: no Celery worker. The end-to-end form (Redis
killed under a running job) is test_redis_restart.py."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from smoothcert.service.core.jobs import new_job_id
from smoothcert.service.core.settings import Settings
from smoothcert.service.devstack.redis_server import RedisServer
from smoothcert.worker.queue import outage
from smoothcert.worker.queue.context import WorkerContext

pytestmark = pytest.mark.process  # starts a Redis server


@pytest.fixture
def away(tmp_path):
    """A context whose Redis server is not running yet, and that server (start() brings it)."""
    server = RedisServer(tmp_path / "redis", persist=False)
    ctx = WorkerContext(Settings(redis_url=server.url, data_dir=tmp_path / "data"))
    yield ctx, server
    ctx.redis().close()
    server.stop()


def test_a_call_redis_cannot_answer_is_skipped_with_one_warning_per_outage(away, caplog):
    ctx, server = away
    caplog.set_level(logging.WARNING, logger=outage.__name__)
    job_id = new_job_id()
    for _ in range(3):
        check = outage.tolerant(lambda: ctx.jobs.cancel_requested(job_id), "away", "a cancel check")
        assert check == "away"
    lost = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(lost) == 1 and "a cancel check skipped" in lost[0]
    server.start()
    ctx.jobs.create(job_id, "certify", {})
    ctx.jobs.request_cancel(job_id)
    assert outage.tolerant(lambda: ctx.jobs.cancel_requested(job_id), False, "a cancel check")
    assert any("Redis answers again" in r.getMessage() for r in caplog.records)


def test_an_outcome_is_tried_again_until_redis_is_back_or_given_up(away):
    ctx, server = away
    job_id = new_job_id()
    gave_up = time.monotonic()
    assert outage.persist(lambda: ctx.jobs.get(job_id), "a read", retry_s=0.5) is None
    assert time.monotonic() - gave_up >= 0.25  # it tried more than once before giving up
    threading.Timer(1.0, server.start).start()
    written = outage.persist(
        lambda: ctx.redis().set(f"outage-test:{job_id}", "1"), "a write", retry_s=60
    )
    assert written is True and ctx.redis().get(f"outage-test:{job_id}") == b"1"
