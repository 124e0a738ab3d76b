"""The Celery tasks: each checks its message, admits the delivery and calls the job runner.

A message that does not match its job record (:mod:`smoothcert.worker.queue.messages`) is
dropped with one warning line that says why, before any file is touched; the job, if there is
one, is left as it was. The work itself is :mod:`smoothcert.worker.queue.runner`, plain functions
that run without a broker; the training task is :mod:`smoothcert.worker.queue.train_tasks`.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from smoothcert.service.core.queue import CERTIFY_CHUNK_TASK, CERTIFY_TASK, CHECK_MODEL_TASK
from smoothcert.worker.queue import context, messages
from smoothcert.worker.queue.celery_app import app
from smoothcert.worker.queue.messages import checked
from smoothcert.worker.queue.runner import (
    admitted,
    check_model,
    complete_chunk,
    drop_inputs_when_done,
    finish,
    record_errors,
    run_job,
    time_runtimes,
)


@app.task(name=CERTIFY_TASK, bind=True)
def certify_task(self, job_id: str, message: dict[str, Any]) -> None:
    """Certify or predict the inputs saved for ``job_id`` with its recorded parameters."""
    ctx = context.current()
    task = checked(
        self.name,
        job_id,
        lambda: messages.certify_task(ctx.jobs, self.request.id, job_id, message),
    )
    if task is None:
        return
    try:
        finish(ctx, job_id, lambda: run_job(ctx, job_id, task))
    finally:
        drop_inputs_when_done(ctx, job_id)


@app.task(name=CERTIFY_CHUNK_TASK, bind=True)
def certify_chunk_task(self, job_id: str, message: dict[str, Any]) -> None:
    """Certify one chunk of a dataset job (``message``: the job's parameters and the chunk's range)."""
    ctx = context.current()
    task = checked(
        self.name,
        job_id,
        lambda: messages.chunk_task(ctx.jobs, ctx.datasets, self.request.id, job_id, message),
    )
    if task is None:
        return
    if not admitted(ctx, job_id, ctx.ledger.start(job_id, task.index), f"chunk {task.index}"):
        return  # canceled, failed in another chunk, complete, or past the redelivery cap
    worker = self.request.hostname or f"{socket.gethostname()}.{os.getpid()}"
    record_errors(ctx, job_id, lambda: complete_chunk(ctx, job_id, task, worker))


@app.task(name=CHECK_MODEL_TASK, bind=True)
def check_model_task(self, job_id: str, model_id: str) -> None:
    """Load and try a freshly uploaded model; the API waits for this job's record."""
    ctx = context.current()
    model = checked(
        self.name,
        job_id,
        lambda: messages.check_model_message(ctx.jobs, self.request.id, job_id, model_id),
    )
    if model is not None:
        finish(ctx, job_id, lambda: check_model(ctx, model))
        time_runtimes(ctx, job_id, model)  # after the answer: the upload does not wait for it
