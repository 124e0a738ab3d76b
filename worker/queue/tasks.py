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

from smoothcert.service.core.dataset_store import DatasetStore
from smoothcert.service.core.queue import CERTIFY_CHUNK_TASK, CERTIFY_TASK, CHECK_MODEL_TASK
from smoothcert.worker.queue import messages
from smoothcert.worker.queue.celery_app import app, settings
from smoothcert.worker.queue.messages import checked
from smoothcert.worker.queue.runner import (
    admitted,
    check_model,
    chunk_ledger,
    complete_chunk,
    drop_inputs_when_done,
    finish,
    job_store,
    record_errors,
    run_job,
)


@app.task(name=CERTIFY_TASK, bind=True)
def certify_task(self, job_id: str, spec: dict[str, Any]) -> None:
    """Certify or predict the inputs saved for ``job_id`` with its recorded parameters."""
    jobs = job_store()
    trusted = checked(
        self.name, job_id, lambda: messages.certify_spec(jobs, self.request.id, job_id, spec)
    )
    if trusted is None:
        return
    try:
        finish(job_id, jobs, lambda: run_job(job_id, trusted, jobs))
    finally:
        drop_inputs_when_done(job_id, jobs)


@app.task(name=CERTIFY_CHUNK_TASK, bind=True)
def certify_chunk_task(self, job_id: str, spec: dict[str, Any]) -> None:
    """Certify one chunk of a dataset job (``spec``: the job's parameters and the chunk's range)."""
    jobs, ledger = job_store(), chunk_ledger()
    trusted = checked(
        self.name,
        job_id,
        lambda: messages.chunk_spec(
            jobs, DatasetStore(settings.datasets_dir), self.request.id, job_id, spec
        ),
    )
    if trusted is None:
        return
    if not admitted(
        jobs, job_id, ledger.start(job_id, trusted["chunk"]), f"chunk {trusted['chunk']}"
    ):
        return  # canceled, failed in another chunk, complete, or past the redelivery cap
    worker = self.request.hostname or f"{socket.gethostname()}.{os.getpid()}"
    record_errors(job_id, jobs, lambda: complete_chunk(job_id, trusted, jobs, ledger, worker))


@app.task(name=CHECK_MODEL_TASK, bind=True)
def check_model_task(self, job_id: str, model_id: str) -> None:
    """Load and try a freshly uploaded model; the API waits for this job's record."""
    jobs = job_store()
    model = checked(
        self.name,
        job_id,
        lambda: messages.check_model_message(jobs, self.request.id, job_id, model_id),
    )
    if model is not None:
        finish(job_id, jobs, lambda: check_model(model))
