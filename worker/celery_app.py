"""The Celery application: broker settings shared by the API (which only sends) and the workers.

Importing this module is torch-free, so the API can use :func:`make_celery` to enqueue tasks by
name; only a worker imports :mod:`smoothcert.worker.tasks` and :mod:`smoothcert.worker.train_tasks`.
Training jobs are routed to their own queue, ``train``, so a long training run never holds up
certification: a worker consumes ``smoothcert`` (the default), ``train``, or both
(``--queues smoothcert,train``, as ``smoothcert up`` does). Reliability settings (design §6):
late acks with one prefetched message, so a task whose worker dies is redelivered; the Redis
visibility timeout exceeds the hard time limit, so a long task is never handed out twice while
it still runs. Workers announce themselves with a heartbeat key that ``/readyz`` looks for.

``python -m smoothcert.worker.celery_app [celery worker options]`` (or :func:`main`) starts a
worker; ``smoothcert worker`` calls :func:`main`.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

# Set before a worker process first imports torch: idle OpenMP threads would otherwise spin
# between batches and take the cores from the noise generation and from onnxruntime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from smoothcert.service.settings import Settings

CERTIFY_TASK = "smoothcert.certify"
CERTIFY_CHUNK_TASK = "smoothcert.certify_chunk"
CHECK_MODEL_TASK = "smoothcert.check_model"
TRAIN_TASK = "smoothcert.train"
QUEUE = "smoothcert"
TRAIN_QUEUE = "train"
WORKER_TASK_MODULES = ["smoothcert.worker.tasks", "smoothcert.worker.train_tasks"]
HEARTBEAT_PREFIX = "smoothcert:worker:"
HEARTBEAT_EVERY_S, HEARTBEAT_TTL_S = 2.0, 10


def make_celery(settings: Settings, *, include_tasks: bool = False) -> Celery:
    """A Celery app on ``settings.broker_url``; ``include_tasks`` registers the worker's tasks."""
    app = Celery("smoothcert", broker=settings.broker_url, set_as_default=False,
                 include=WORKER_TASK_MODULES if include_tasks else [])
    app.conf.update(
        task_default_queue=QUEUE,
        task_routes={TRAIN_TASK: {"queue": TRAIN_QUEUE}},
        task_serializer="json", accept_content=["json"],
        task_ignore_result=True,          # results live in our job records
        task_acks_late=True,
        task_reject_on_worker_lost=True,  # a killed worker's task goes back to the queue
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(1, settings.task_time_limit_s - 30),
        broker_transport_options={"visibility_timeout": settings.task_time_limit_s + 600},
        broker_connection_retry_on_startup=True,
        # The API must answer 503 quickly when Redis is gone, not retry for seconds.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


settings = Settings()
app = make_celery(settings, include_tasks=True)


class _Heartbeat:
    """Writes ``smoothcert:worker:<hostname>`` with a short TTL from a daemon thread.

    A thread, not a task, so the key stays fresh while the worker is busy with a long job.
    """

    def __init__(self, url: str, name: str):
        self.url, self.key = url, HEARTBEAT_PREFIX + name
        self.value = json.dumps({"hostname": name, "pid": os.getpid(), "started_at": time.time()})
        self.stop_event = threading.Event()

    def run(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=2)
        while not self.stop_event.is_set():
            try:
                client.set(self.key, self.value, ex=HEARTBEAT_TTL_S)
            except redis.RedisError:
                pass  # Redis is down; the worker itself reconnects, readyz says not ready
            self.stop_event.wait(HEARTBEAT_EVERY_S)
        try:
            client.delete(self.key)
        except redis.RedisError:
            pass


_heartbeat: _Heartbeat | None = None


@worker_ready.connect
def _start_heartbeat(sender=None, **_):
    global _heartbeat
    name = getattr(sender, "hostname", None) or f"{socket.gethostname()}.{os.getpid()}"
    _heartbeat = _Heartbeat(settings.broker_url, name)
    threading.Thread(target=_heartbeat.run, name="smoothcert-heartbeat", daemon=True).start()


@worker_shutdown.connect
def _stop_heartbeat(**_):
    if _heartbeat is not None:
        _heartbeat.stop_event.set()


def main(argv: list[str] | None = None) -> None:
    """Run a worker; ``argv`` are extra ``celery worker`` options (e.g. ``--concurrency 2``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    defaults = ["worker", "--loglevel", "INFO", "--queues", QUEUE]
    if not any(a.startswith(("-c", "--concurrency")) for a in args):
        defaults += ["--concurrency", str(settings.worker_concurrency)]
    app.worker_main(defaults + args)


if __name__ == "__main__":
    main()
