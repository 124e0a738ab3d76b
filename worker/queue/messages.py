"""What a queue message may say: each is checked against its job record before anything runs.

Whoever can write to Redis can put a message in a queue, so a message is a request to run a job
that the API recorded, nothing more. Its job id must be a job id and name an existing record of
the task's kind, its task id must be the job's (``<job>.<index>`` for a dataset chunk), and its
parameters must spell the record's job (:class:`~smoothcert.service.core.contract.CertifyJob`),
field for field; a chunk's range and noise seed must be the ones the record's job gives
(:meth:`~smoothcert.service.core.contract.ChunkTask.planned`). Otherwise the message is dropped
(:class:`Dropped`, whose text says why) before any file is read, written or removed. What runs is
the record's job, plus the few fields only a message carries (a certify job's labels and radii):
a :class:`~smoothcert.service.core.contract.CertifyTask` or a
:class:`~smoothcert.service.core.contract.ChunkTask`. Files are never named by a
message: a job's inputs are ``DATA_DIR/jobs/<job id>/``, a dataset's files are found by its id in
the dataset store (:mod:`smoothcert.service.core.jobs`, :mod:`smoothcert.service.core.store`).
No Celery here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from smoothcert.service.core.contract import (
    CERTIFY_KINDS,
    TRAIN_KINDS,
    CertifyJob,
    CertifyTask,
    CheckModelTask,
    ChunkTask,
    ContractError,
    TrainTask,
    check_labels,
    check_radii,
    message_job,
)
from smoothcert.service.core.dataset_store import DatasetStore
from smoothcert.service.core.jobs import JobRecord, JobStore, is_job_id

T = TypeVar("T")
log = logging.getLogger(__name__)


class Dropped(Exception):
    """The message is not one the API sent for a recorded job; ``str()`` says why."""


def checked(task: str, job_id: Any, check: Callable[[], T]) -> T | None:
    """``check()``'s answer, or None, with a warning line that says why, when it drops the message."""
    try:
        return check()
    except Dropped as exc:
        log.warning(
            "dropped a %s message for job %s: %s; nothing was run and no file was touched",
            task,
            str(job_id)[:80],
            exc,
        )
        return None


def certify_task(jobs: JobStore, task_id: str | None, job_id: Any, message: Any) -> CertifyTask:
    """What a certify or predict job runs with: its record's job, and the message's labels and
    radii once checked. Dropped when the message does not match the record."""
    record = _record(jobs, job_id, task_id, CERTIFY_KINDS)
    job = _record_job(record)
    if job.dataset is not None:
        raise Dropped(f"job {job_id} is a dataset job, which runs as chunks, not as one task")
    _same_job(job, message, CertifyTask.MESSAGE_ONLY)
    try:
        labels = check_labels(message.get("labels"), job.num_inputs)
        return CertifyTask(job, labels, check_radii(message.get("radii")))
    except ContractError as exc:
        raise Dropped(str(exc)) from None


def chunk_task(
    jobs: JobStore, datasets: DatasetStore, task_id: str | None, job_id: Any, message: Any
) -> ChunkTask:
    """What chunk ``message["chunk"]`` of a dataset job runs with: the record's job, the chunk's
    range and seed as they follow from it, and the message's radii. Dropped on any mismatch."""
    record = _record(jobs, job_id, None, CERTIFY_KINDS)
    job = _record_job(record)
    if job.dataset is None:
        raise Dropped(f"job {job_id} is not a dataset job; it has no chunks")
    if not isinstance(message, dict):
        raise Dropped("its parameters are not a JSON object")
    index, chunks = message.get("chunk"), job.dataset.chunks
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < chunks:
        raise Dropped(f"chunk {index!r} is not one of the job's {chunks} chunks")
    if task_id != f"{job_id}.{index}":
        raise Dropped(
            f"its task id {str(task_id)[:80]!r} is not {job_id}.{index}, the id of chunk {index}"
        )
    _same_job(job, message, ChunkTask.MESSAGE_ONLY)
    try:
        radii = check_radii(message.get("radii"))
    except ContractError as exc:
        raise Dropped(str(exc)) from None
    sha256 = message.get("dataset_sha256")
    planned = ChunkTask.planned(job, index, sha256, radii)
    differ = [k for k in ("start", "stop", "chunk_seed") if message.get(k) != getattr(planned, k)]
    if differ:
        raise Dropped(
            f"its {', '.join(differ)} differ from what the job record gives for chunk {index}"
        )
    dataset = datasets.get(job.dataset.dataset_id)
    if dataset is not None and dataset.get("sha256") != sha256:
        raise Dropped(f"its dataset_sha256 is not that of dataset {job.dataset.dataset_id}")
    return planned


def check_model_message(jobs: JobStore, task_id: str | None, job_id: Any, model_id: Any) -> str:
    """The model a check_model job loads; Dropped unless the record names that model."""
    record = _record(jobs, job_id, task_id, ("check_model",))
    try:
        recorded = CheckModelTask.from_record_params(record.params)
    except ContractError as exc:
        raise Dropped(f"the record of job {job_id} holds no check_model job: {exc}") from None
    if recorded != CheckModelTask(model_id):
        raise Dropped(
            f"job {job_id} checks model {recorded.model_id!r}, not {str(model_id)[:80]!r}"
        )
    return recorded.model_id


def train_task(
    jobs: JobStore, task_id: str | None, job_id: Any, message: Any, kind: str = "train"
) -> TrainTask:
    """A ``kind`` job's task (``train``, or ``train_denoiser``); Dropped unless the record is of
    that kind, the message is one's and its parameters are exactly the record's (the API records
    the config's fields flat)."""
    assert kind in TRAIN_KINDS
    record = _record(jobs, job_id, task_id, (kind,))
    try:
        task = TrainTask.from_message(kind, message)
    except ContractError as exc:
        raise Dropped(str(exc)) from None
    if task.record_params() != record.params:
        raise Dropped("its parameters differ from the job record's")
    return task


def _record(jobs: JobStore, job_id: Any, task_id: str | None, kinds: tuple[str, ...]) -> JobRecord:
    """The record of ``job_id``, if it is a job id of one of ``kinds`` and (unless ``task_id`` is
    None) the message's task id is the job id."""
    if not is_job_id(job_id):
        raise Dropped(f"{str(job_id)[:80]!r} is not a job id")
    if task_id is not None and task_id != job_id:
        raise Dropped(f"its task id {str(task_id)[:80]!r} is not its job id")
    record = jobs.get(job_id, rows=False)  # its status and parameters, not its result's rows
    if record is None:
        raise Dropped(f"there is no record of job {job_id}")
    if record.kind not in kinds:
        raise Dropped(f"job {job_id} is a {record.kind} job, not {' or '.join(kinds)}")
    return record


def _record_job(record: JobRecord) -> CertifyJob:
    """The job a certify or predict record holds; Dropped when its parameters are not one's, or
    its mode is not its kind."""
    try:
        job = record.certify_job()
    except ContractError as exc:
        raise Dropped(f"the record of job {record.id} holds no certify job: {exc}") from None
    if job.params.mode != record.kind:
        raise Dropped(
            f"job {record.id} is a {record.kind} job, its record says mode {job.params.mode!r}"
        )
    return job


def _same_job(job: CertifyJob, message: Any, message_only: tuple[str, ...]) -> None:
    """Dropped unless ``message`` less ``message_only`` spells ``job``, field for field."""
    try:
        given = message_job(message, message_only)
    except ContractError as exc:
        if not exc.fields:
            raise Dropped(str(exc)) from None
        differ = sorted(set(exc.fields))
    else:
        differ = job.differences(given)
    if differ:
        raise Dropped(
            "its parameters differ from the job record's: " + ", ".join(map(str, differ))[:200]
        )
