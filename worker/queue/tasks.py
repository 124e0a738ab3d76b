"""The Celery tasks: each unpacks its message, admits the delivery and calls the job runner.

The work itself is :mod:`smoothcert.worker.queue.runner`, plain functions that run without a
broker; the training task is :mod:`smoothcert.worker.queue.train_tasks`.
"""
from __future__ import annotations

import os
import socket
from typing import Any

from smoothcert.service.core.queue import CERTIFY_CHUNK_TASK, CERTIFY_TASK, CHECK_MODEL_TASK
from smoothcert.worker.queue.celery_app import app
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


@app.task(name=CERTIFY_TASK)
def certify_task(job_id: str, spec: dict[str, Any]) -> None:
    """Certify or predict the inputs saved for ``job_id``; ``spec`` holds paths and parameters."""
    jobs = job_store()
    try:
        finish(job_id, jobs, lambda: run_job(job_id, spec, jobs))
    finally:
        drop_inputs_when_done(job_id, spec, jobs)


@app.task(name=CERTIFY_CHUNK_TASK, bind=True)
def certify_chunk_task(self, job_id: str, spec: dict[str, Any]) -> None:
    """Certify one chunk of a dataset job (``spec``: the job's parameters and the chunk's range)."""
    jobs, ledger = job_store(), chunk_ledger()
    if not admitted(jobs, job_id, ledger.start(job_id, spec["chunk"]), f"chunk {spec['chunk']}"):
        return  # canceled, failed in another chunk, complete, or past the redelivery cap
    worker = self.request.hostname or f"{socket.gethostname()}.{os.getpid()}"
    record_errors(job_id, jobs, lambda: complete_chunk(job_id, spec, jobs, ledger, worker))


@app.task(name=CHECK_MODEL_TASK)
def check_model_task(job_id: str, model_id: str) -> None:
    """Load and try a freshly uploaded model; the API waits for this job's record."""
    jobs = job_store()
    finish(job_id, jobs, lambda: check_model(model_id))

