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

import os
import sys

# Set before a worker process first imports torch: idle OpenMP threads would otherwise spin
# between batches and take the cores from the noise generation and from onnxruntime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from celery.signals import celeryd_init  # noqa: E402

from smoothcert.service.core.logs import capture_output, install_worker_hooks  # noqa: E402
from smoothcert.service.core.queue import QUEUE, WorkerTransport, make_celery  # noqa: E402
from smoothcert.service.core.settings import Settings  # noqa: E402
from smoothcert.worker.queue import liveness  # noqa: E402

WORKER_TASK_MODULES = ("smoothcert.worker.queue.tasks", "smoothcert.worker.queue.train_tasks")

settings = Settings()
app = make_celery(settings, include=WORKER_TASK_MODULES, task_cls="smoothcert.worker.queue.liveness:LeasedTask")
# A task whose pool process died goes back to the front of its queue, not the back.
app.conf.broker_transport = WorkerTransport
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
    app.worker_main(defaults + args)


if __name__ == "__main__":
    main()
