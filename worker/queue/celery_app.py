"""The worker's Celery application: the shared queue contract plus this side's tasks.

The names, queues and reliability settings are :mod:`smoothcert.service.core.queue`, which the
API uses too (it only sends). Importing this module builds the worker's app, registers its task
modules (:mod:`~smoothcert.worker.queue.tasks`, :mod:`~smoothcert.worker.queue.train_tasks`),
installs the job-id log hooks and the liveness signals: only a worker process imports it. Every
task runs under a lease and workers announce themselves with heartbeat keys
(:mod:`smoothcert.worker.queue.liveness`): ``/readyz`` lists them, and a task whose whole worker
died is sent again as soon as that worker's heartbeat expires.

``python -m smoothcert.worker.queue.celery_app [celery worker options]`` (or :func:`main`) starts a
worker; ``smoothcert worker`` calls :func:`main`.
"""

from __future__ import annotations

import sys

from celery.signals import celeryd_init, worker_process_init

from smoothcert.models import process_tuning
from smoothcert.service.core.logs import capture_output, install_worker_hooks
from smoothcert.service.core.queue import QUEUE, make_celery, worker_transport
from smoothcert.service.core.store import private_data_dir
from smoothcert.worker.queue import context, liveness

WORKER_TASK_MODULES = ("smoothcert.worker.queue.tasks", "smoothcert.worker.queue.train_tasks")

# The composition root: settings, Redis, stores and caches, built once (worker/queue/context.py).
worker = context.start()
settings = worker.settings
private_data_dir(settings.data_dir)  # files 0600, folders 0700, in the pool processes too
app = make_celery(
    settings, include=WORKER_TASK_MODULES, task_cls="smoothcert.worker.queue.liveness:LeasedTask"
)
# A task whose pool process died goes back to the front of its queue, not the back (kombu's
# Redis transport, or its Sentinel transport when SMOOTHCERT_REDIS_SENTINELS is set).
app.conf.broker_transport = worker_transport(settings)
install_worker_hooks(settings)  # JSON log lines with the job id (smoothcert.service.core.logs)


@celeryd_init.connect(weak=False)
def _capture_output(**_) -> None:
    """A JSON worker's descriptors 1 and 2 become JSON lines too (what Celery, billiard and
    onnxruntime print past logging); in the worker's main process as it starts, before it forks."""
    if settings.log_format == "json":
        capture_output("worker")


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
    # Before the task modules import torch (the OpenMP wait policy is read then): malloc, OpenMP
    # and each pool process's share of the cores (smoothcert.models.process_tuning).
    process_tuning.tune_process(_concurrency(args, settings.worker_concurrency))
    app.worker_main(defaults + args)


def _concurrency(args: list[str], default: int) -> int:
    """The pool size ``celery worker`` will use: the last -c/--concurrency option, else ``default``."""
    value = str(default)
    for i, arg in enumerate(args):
        if arg in ("-c", "--concurrency") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--concurrency="):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-c") and len(arg) > 2:
            value = arg[2:]
    return int(value) if value.isdigit() and int(value) > 0 else default


@worker_process_init.connect(weak=False)
def _pool_process_threads(**_) -> None:
    """Each pool process takes its share of the cores as torch threads (forked, it starts with the parent's)."""
    process_tuning.apply_threads()


if __name__ == "__main__":
    main()
