"""The Celery application: broker settings shared by the API (which only sends) and the workers.

Importing this module is torch-free, so the API can use :func:`make_celery` to enqueue tasks by
name; only a worker imports :mod:`smoothcert.worker.tasks` and :mod:`smoothcert.worker.train_tasks`.
Training jobs are routed to their own queue, ``train``, so a long training run never holds up
certification: a worker consumes ``certify`` (the default), ``train``, or both
(``--queues certify,train``, as ``smoothcert up`` does). Reliability settings (design §6):
late acks with one prefetched message, so a task whose worker dies is redelivered; the Redis
visibility timeout exceeds the hard time limit, so a long task is never handed out twice while
it still runs. Every task runs under a lease and workers announce themselves with heartbeat
keys (:mod:`smoothcert.worker.liveness`): ``/readyz`` lists them, and a task whose whole worker
died is sent again as soon as that worker's heartbeat expires.

``python -m smoothcert.worker.celery_app [celery worker options]`` (or :func:`main`) starts a
worker; ``smoothcert worker`` calls :func:`main`.
"""
from __future__ import annotations

import os
import sys

# Set before a worker process first imports torch: idle OpenMP threads would otherwise spin
# between batches and take the cores from the noise generation and from onnxruntime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from celery import Celery

from smoothcert.service.logs import install_worker_hooks
from smoothcert.service.settings import Settings
from smoothcert.worker import liveness
from smoothcert.worker.liveness import HEARTBEAT_PREFIX  # noqa: F401  (re-exported: /readyz, tests)

CERTIFY_TASK = "smoothcert.certify"
CERTIFY_CHUNK_TASK = "smoothcert.certify_chunk"
CHECK_MODEL_TASK = "smoothcert.check_model"
TRAIN_TASK = "smoothcert.train"
QUEUE = "certify"
TRAIN_QUEUE = "train"
WORKER_TASK_MODULES = ["smoothcert.worker.tasks", "smoothcert.worker.train_tasks"]


def make_celery(settings: Settings, *, include_tasks: bool = False) -> Celery:
    """A Celery app on ``settings.broker_url``; ``include_tasks`` registers the worker's tasks."""
    app = Celery("smoothcert", broker=settings.broker_url, set_as_default=False,
                 include=WORKER_TASK_MODULES if include_tasks else [],
                 task_cls="smoothcert.worker.liveness:LeasedTask")
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
install_worker_hooks(settings)  # JSON log lines with the job id (smoothcert.service.logs)


liveness.install(app)


def main(argv: list[str] | None = None) -> None:
    """Run a worker; ``argv`` are extra ``celery worker`` options (e.g. ``--concurrency 2``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    # --quiet (a `celery` option, before the sub-command): no start-up banner, so that every
    # line of a JSON log is a JSON object.
    quiet = ["--quiet"] if settings.log_format == "json" else []
    defaults = [*quiet, "worker", "--loglevel", settings.log_level, "--queues", QUEUE]
    if not any(a.startswith(("-c", "--concurrency")) for a in args):
        defaults += ["--concurrency", str(settings.worker_concurrency)]
    app.worker_main(defaults + args)


if __name__ == "__main__":
    main()
