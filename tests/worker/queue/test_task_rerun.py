"""A task whose own bookkeeping loses Redis runs again in its process once Redis answers.

A Sentinel failover (or a restart) can cut the task's connection while it claims its lease or
starts its job; its broker connection is gone too, so failing the task would leave its message
unacknowledged until the visibility timeout (hours). Here a real Redis is killed under a task of
the project's task class (LeasedTask) and started again a second later.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis
from celery import Celery

from smoothcert.service.core.settings import Settings
from smoothcert.service.devstack.redis_server import RedisServer
from smoothcert.worker.queue import context, liveness
from smoothcert.worker.queue.leases import LEASES_KEY

pytestmark = pytest.mark.process

BACK_AFTER_S = 1.0


def test_a_task_that_loses_redis_runs_again_once_redis_answers(tmp_path):
    server = RedisServer(tmp_path / "redis", persist=False).start()
    before = list(context._current)
    context.start(Settings(redis_url=server.url, data_dir=tmp_path / "data"))
    app = Celery("rerun", set_as_default=False, task_cls=liveness.LeasedTask)
    calls: list[float] = []
    back: dict[str, float] = {}
    timer = threading.Timer(BACK_AFTER_S, lambda: restart())

    def restart() -> None:
        nonlocal server
        server = RedisServer(
            tmp_path / "redis", port=server.port, password=server.password, persist=False
        ).start()
        back["at"] = time.monotonic()

    @app.task(name="tests.rerun")
    def job(job_id: str) -> int:
        calls.append(time.monotonic())
        if len(calls) == 1:  # Redis dies under the task's first call, as in a failover
            server.process.kill()
            server.process.wait()
            timer.start()
            raise redis.ConnectionError("Connection closed by server.")
        return context.current().redis().incr(f"runs:{job_id}")

    try:
        result = job.apply(args=["job-1"], task_id="task-1")
        assert result.successful(), result.traceback
        assert result.get() == 1  # the rerun's write, on the Redis that came back
        assert len(calls) == 2 and calls[1] >= back["at"]  # run again only once Redis answered
        client = redis.Redis.from_url(server.url)
        assert client.hlen(LEASES_KEY) == 0  # the rerun claimed the lease and released it
        client.close()
    finally:
        context._current[:] = before
        if timer.is_alive():
            timer.join()  # the restart, before the server is stopped
        server.stop()
