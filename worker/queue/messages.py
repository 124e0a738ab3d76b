"""What a queue message may say: each is checked against its job record before anything runs.

Whoever can write to Redis can put a message in a queue, so a message is a request to run a job
that the API recorded, nothing more. Its job id must be a job id and name an existing record of
the task's kind, its task id must be the job's (``<job>.<index>`` for a dataset chunk), and its
parameters must be the record's, exactly; a chunk's range and noise seed must be the ones the
record's parameters give (:func:`~smoothcert.service.core.job_chunks.plan_chunks`,
:func:`~smoothcert.service.core.job_chunks.chunk_seed`). Otherwise the message is dropped
(:class:`Dropped`, whose text says why) before any file is read, written or removed. What runs is
built from the record, plus the few fields only a message carries (a certify job's labels and
radii). Files are never named by a message: a job's inputs are ``DATA_DIR/jobs/<job id>/``, a
dataset's files are found by its id in the dataset store (:mod:`smoothcert.service.core.jobs`,
:mod:`smoothcert.service.core.store`). No Celery here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

from smoothcert.service.core.dataset_store import DatasetStore
from smoothcert.service.core.job_chunks import chunk_seed, plan_chunks
from smoothcert.service.core.jobs import JobRecord, JobStore, is_job_id

CERTIFY_KINDS = ("certify", "predict")
# Fields of a certify message that are not parameters of the record: what the worker uses of
# them is checked below; "inputs_path" came from APIs before paths were derived and is ignored.
_CERTIFY_ONLY = ("labels", "radii", "inputs_path")
_CHUNK_ONLY = ("radii", "dataset_sha256", "chunk", "start", "stop", "chunk_seed")
_ABSENT = object()
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


def certify_spec(jobs: JobStore, task_id: str | None, job_id: Any, spec: Any) -> dict[str, Any]:
    """What a certify or predict job runs with: its record's parameters, and the message's labels
    and radii once checked. Dropped when the message does not match the record."""
    record = _record(jobs, job_id, task_id, CERTIFY_KINDS)
    if "dataset_id" in record.params:
        raise Dropped(f"job {job_id} is a dataset job, which runs as chunks, not as one task")
    _same_parameters(record, spec, _CERTIFY_ONLY)
    count = record.params.get("num_inputs")
    labels, radii = spec.get("labels"), spec.get("radii")
    if labels is not None and not (
        isinstance(labels, list)
        and len(labels) == count
        and all(isinstance(v, int) and not isinstance(v, bool) for v in labels)
    ):
        raise Dropped(f"its labels are not {count} integers, one per input")
    _check_radii(radii)
    return {**record.params, "labels": labels, "radii": radii}


def chunk_spec(
    jobs: JobStore, datasets: DatasetStore, task_id: str | None, job_id: Any, spec: Any
) -> dict[str, Any]:
    """What chunk ``spec["chunk"]`` of a dataset job runs with: the record's parameters, the chunk's
    range and seed as they follow from them, and the message's radii. Dropped on any mismatch."""
    record = _record(jobs, job_id, None, CERTIFY_KINDS)
    params = record.params
    if "dataset_id" not in params:
        raise Dropped(f"job {job_id} is not a dataset job; it has no chunks")
    if not isinstance(spec, dict):
        raise Dropped("its parameters are not a JSON object")
    index = spec.get("chunk")
    chunks = params.get("chunks")
    if (
        not isinstance(index, int)
        or isinstance(index, bool)
        or not isinstance(chunks, int)
        or not 0 <= index < chunks
    ):
        raise Dropped(f"chunk {index!r} is not one of the job's {chunks} chunks")
    if task_id != f"{job_id}.{index}":
        raise Dropped(
            f"its task id {str(task_id)[:80]!r} is not {job_id}.{index}, the id of chunk {index}"
        )
    _same_parameters(record, spec, _CHUNK_ONLY)
    skip = params["skip"]
    start, stop = plan_chunks(skip, skip + params["num_inputs"], params["chunk_size"])[index]
    derived = {"start": start, "stop": stop, "chunk_seed": chunk_seed(params["seed"], index)}
    differ = [k for k, v in derived.items() if spec.get(k) != v]
    if differ:
        raise Dropped(
            f"its {', '.join(differ)} differ from what the job record gives for chunk {index}"
        )
    dataset = datasets.get(params["dataset_id"])
    sha256 = spec.get("dataset_sha256")
    if dataset is not None and dataset.get("sha256") != sha256:
        raise Dropped(f"its dataset_sha256 is not that of dataset {params['dataset_id']}")
    _check_radii(spec.get("radii"))
    return {
        **params,
        **derived,
        "chunk": index,
        "radii": spec.get("radii"),
        "dataset_sha256": sha256,
    }


def check_model_message(jobs: JobStore, task_id: str | None, job_id: Any, model_id: Any) -> str:
    """The model a check_model job loads; Dropped unless the record names that model."""
    record = _record(jobs, job_id, task_id, ("check_model",))
    if record.params != {"model_id": model_id}:
        raise Dropped(
            f"job {job_id} checks model {record.params.get('model_id')!r}, not {str(model_id)[:80]!r}"
        )
    return str(model_id)


def train_spec(jobs: JobStore, task_id: str | None, job_id: Any, spec: Any) -> dict[str, Any]:
    """A training job's ``{"config", "dataset", "name"}``; Dropped unless the record's parameters are
    exactly these (the API records ``{"dataset", "name", **config}``)."""
    record = _record(jobs, job_id, task_id, ("train",))
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("config"), dict)
        or set(spec) != {"config", "dataset", "name"}
    ):
        raise Dropped("its parameters are not a training job's {config, dataset, name}")
    if {"dataset": spec["dataset"], "name": spec["name"], **spec["config"]} != record.params:
        raise Dropped("its parameters differ from the job record's")
    return spec


def train_denoiser_spec(
    jobs: JobStore, task_id: str | None, job_id: Any, spec: Any
) -> dict[str, Any]:
    """A denoiser training job's ``{"config", "dataset", "classifier", "init", "name"}``; Dropped unless
    the record's parameters are exactly these (the API records them with the config's fields flat)."""
    record = _record(jobs, job_id, task_id, ("train_denoiser",))
    keys = {"config", "dataset", "classifier", "init", "name"}
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict) or set(spec) != keys:
        raise Dropped(
            "its parameters are not a denoiser training job's {config, dataset, classifier, init, name}"
        )
    if {k: spec[k] for k in keys - {"config"}} | spec["config"] != record.params:
        raise Dropped("its parameters differ from the job record's")
    return spec


def _record(jobs: JobStore, job_id: Any, task_id: str | None, kinds: tuple[str, ...]) -> JobRecord:
    """The record of ``job_id``, if it is a job id of one of ``kinds`` and (unless ``task_id`` is
    None) the message's task id is the job id."""
    if not is_job_id(job_id):
        raise Dropped(f"{str(job_id)[:80]!r} is not a job id")
    if task_id is not None and task_id != job_id:
        raise Dropped(f"its task id {str(task_id)[:80]!r} is not its job id")
    record = jobs.get(job_id)
    if record is None:
        raise Dropped(f"there is no record of job {job_id}")
    if record.kind not in kinds:
        raise Dropped(f"job {job_id} is a {record.kind} job, not {' or '.join(kinds)}")
    return record


def _same_parameters(record: JobRecord, spec: Any, message_only: tuple[str, ...]) -> None:
    """Dropped unless ``spec`` less ``message_only`` is the record's parameters, key for key."""
    if not isinstance(spec, dict):
        raise Dropped("its parameters are not a JSON object")
    given = {k: v for k, v in spec.items() if k not in message_only}
    differ = sorted(
        k
        for k in set(given) | set(record.params)
        if given.get(k, _ABSENT) != record.params.get(k, _ABSENT)
    )
    if differ:
        raise Dropped(
            "its parameters differ from the job record's: " + ", ".join(map(str, differ))[:200]
        )
    if record.params.get("mode", record.kind) != record.kind:
        raise Dropped(
            f"job {record.id} is a {record.kind} job, its record says mode {record.params['mode']!r}"
        )


def _check_radii(radii: Any) -> None:
    if radii is None:
        return
    if not isinstance(radii, list) or not all(
        isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r >= 0
        for r in radii
    ):
        raise Dropped("its radii are not a list of finite non-negative numbers")
