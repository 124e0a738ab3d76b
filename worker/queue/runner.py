"""The job runner: what a queue task does, as plain functions of the worker's context, a job id
and the task its message was checked into.

A task (:mod:`smoothcert.worker.queue.tasks`) checks its message against the job record
(:mod:`smoothcert.worker.queue.messages`), admits its delivery and calls one of these with the
:class:`~smoothcert.service.core.contract.CertifyTask` or
:class:`~smoothcert.service.core.contract.ChunkTask` the check returned. The stores, settings,
Redis client and model caches come from the
:class:`~smoothcert.worker.queue.context.WorkerContext`, so these run without Celery.

Files are found by ids, never by a path from a message: the inputs wait in ``DATA_DIR/jobs/<id>/``,
datasets in ``DATA_DIR/datasets/<id>/``, and a path that resolves outside them is refused. Every
outcome lands in the job record (:mod:`smoothcert.service.core.jobs`); nothing is returned to
Celery. A task runs again after its worker died (late acks), at most ``max_deliveries`` times;
running the same job again gives the same answer because the seed is part of the record. A
dataset job is one task per chunk (:mod:`smoothcert.service.core.job_chunks`); the redelivery cap
counts per chunk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded

from smoothcert.models.loaders import load_stored_model as load_from_store
from smoothcert.models.metadata import ModelError, check_upload_metadata
from smoothcert.models.runtimes import batch_class, select_runtime
from smoothcert.service.core.contract import CertifyParams, CertifyTask, ChunkTask
from smoothcert.service.core.dataset_files import DatasetFileError
from smoothcert.service.core.images import to_unit
from smoothcert.service.core.jobs import RUNNING, SUCCEEDED, TERMINAL, job_inputs
from smoothcert.service.core.params import DEFAULT_PRECISION, DEFAULT_RUNTIME
from smoothcert.service.core.samples import record_result_samples
from smoothcert.service.core.storage_quota import drop_job_inputs
from smoothcert.worker.queue import outage, watchdog
from smoothcert.worker.queue.certify_run import (
    kept_samples,
    label_metrics,
    label_rows,
    run_engine,
    throttled,
)
from smoothcert.worker.queue.context import WorkerContext
from smoothcert.worker.queue.dataset_jobs import combine_chunks, run_chunk
from smoothcert.worker.queue.liveness import report_process, retire_process
from smoothcert.worker.smoothing import Canceled, InputError, default_batch_size

log = logging.getLogger(__name__)
_UNKNOWN: Any = object()  # a record that could not be read


def loaded_model(ctx: WorkerContext, meta: dict[str, Any]):
    """Load a stored model with its recorded fields; the last few stay loaded in this process."""

    def load():
        model = load_from_store(ctx.models, meta, device=ctx.settings.device)
        report_process(
            model={
                "id": meta["id"],
                "name": meta.get("name"),
                "runtime": model.runtime,
                "provider": model.provider,
            },
            ctx=ctx,
        )
        return model

    return ctx.loaded_models.get((meta["id"], meta["sha256"]), load)[0]


def check_model(ctx: WorkerContext, model_id: str) -> dict[str, Any]:
    """Load a pending model (the loader runs it on its check batches); return what it found out.

    Raises ModelError (one line) when the file cannot be loaded or does not fit its metadata, and
    when loading and checking take longer than ``SMOOTHCERT_MODEL_CHECK_DEADLINE_S``: a model
    that does not return (an ONNX Loop of 2^62 iterations) keeps a CPU until its process dies, so
    the check runs in a thread of its own and, past the deadline, this process is retired.
    """
    meta = ctx.models.get(model_id, include_pending=True)
    if meta is None:
        raise ModelError(f"model {model_id} disappeared before it was checked")
    outcome: dict[str, Any] = {}

    def load() -> None:
        try:
            outcome["model"] = loaded_model(ctx, meta)
        except BaseException as exc:  # handed to the task's thread below
            outcome["error"] = exc

    deadline_s = ctx.settings.model_check_deadline_s
    checker = threading.Thread(target=load, name=f"check-{model_id}", daemon=True)
    checker.start()
    checker.join(deadline_s)
    if checker.is_alive():
        retire_process(f"model {model_id} is still running its check batches")
        raise ModelError(
            f"the model did not load and answer its check batches within "
            f"{deadline_s:g} s (SMOOTHCERT_MODEL_CHECK_DEADLINE_S); "
            "a model that slow, or one that never returns, would hold a worker"
        )
    if "error" in outcome:
        raise outcome["error"]
    model = outcome["model"]
    found = model.info.to_dict()
    found.pop("sha256", None)
    # A name or an extra too large for every listing to carry fails here, before the result
    # (which holds them) reaches the job record.
    check_upload_metadata(found)
    warnings = upload_warnings(found)
    return {
        **found,
        "runtime": model.runtime,
        "provider": model.provider,
        **({"warnings": warnings} if warnings else {}),
    }


def time_runtimes(ctx: WorkerContext, job_id: str, model_id: str) -> None:
    """Once model ``model_id`` passed its check (job ``job_id``), choose its runtime for the
    defaults (runtime auto, float32, the engine's batch size), so that its first job finds the
    choice cached under ``DATA_DIR/cache`` instead of waiting seconds at 0 % for the timing. Run
    after the check's answer, which the upload waits for; a failure is only logged (the job then
    times the runtimes itself)."""
    try:
        record = ctx.jobs.get(job_id)
        meta = ctx.models.get(model_id, include_pending=True)
        if record is None or record.status != SUCCEEDED or meta is None:
            return  # refused, or deleted since
        if (meta.get("kind") or "classifier") != "classifier":
            return  # a denoiser is certified only inside a pipeline, which chooses per part
        model = loaded_model(ctx, meta)  # loaded by the check: this process's cache
        runtime_model(ctx, model, meta, DEFAULT_RUNTIME, None, DEFAULT_PRECISION)
    except Exception as exc:  # noqa: BLE001 - any runtime's failure; the job measures again
        log.warning("timing the runtimes of model %s failed: %s", model_id, exc)


def upload_warnings(info: dict[str, Any]) -> list[str]:
    """What an upload's answer should warn of: a classifier without ``normalization``, which then
    receives pixels in [0, 1] as they are, with the noise added there. Nothing tells a model that
    was trained on normalized inputs from one that was not by its scores alone, so the warning
    stands whenever the field is absent."""
    if (info.get("kind") or "classifier") != "classifier" or info.get("normalization"):
        return []
    return [
        "no normalization given: the model receives pixels in [0, 1] as they are (noise is added "
        "there). If it was trained on normalized inputs, upload it again with normalization "
        '(e.g. {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}), which smoothcert '
        "applies after the noise, in front of the model"
    ]


def ready_model(ctx: WorkerContext, params: CertifyParams):
    """The model a job's ``params`` name, loaded and in the runtime and precision they ask for;
    ModelError when it was deleted."""
    meta = ctx.models.get(params.model_id)
    if meta is None:
        raise ModelError(f"model {params.model_id} was deleted")
    model = loaded_model(ctx, meta)
    return runtime_model(ctx, model, meta, params.runtime, params.batch_size, params.precision)


def runtime_model(
    ctx: WorkerContext,
    model,
    meta: dict[str, Any],
    runtime: str,
    batch_size: int | None,
    precision: str = "float32",
):
    """``model`` in ``runtime`` and ``precision`` (models/runtimes.py), for batches of
    ``batch_size`` (None: the engine's default); the choice and the ONNX export are cached under
    ``DATA_DIR/cache``, and the last few such models stay loaded in this process."""
    batch = batch_size or default_batch_size(model.info.input_shape, model.device, model)
    key = (meta["id"], meta["sha256"], runtime, precision, batch_class(batch))

    def select():
        return select_runtime(
            model,
            runtime,
            batch_size=batch,
            cache_dir=ctx.settings.data_dir / "cache",
            precision=precision,
        )

    return ctx.runtime_models.get(key, select)[0]


def run_job(ctx: WorkerContext, job_id: str, task: CertifyTask) -> dict[str, Any]:
    """Run a certify/predict job (its message checked against its record) on the inputs saved
    for it, and return its result."""
    params, jobs = task.job.params, ctx.jobs
    model = ready_model(ctx, params)
    x = saved_inputs(ctx, job_id, task.job.num_inputs)
    jobs.keep_samples(job_id, kept_samples(model, x, task.job, 0))
    should_cancel, progress = watchdog.batches(
        lambda: outage.tolerant(
            lambda: jobs.cancel_requested(job_id), False, "a cancel check", job_id
        ),
        throttled(
            lambda done, total: outage.tolerant(
                lambda: jobs.set_progress(job_id, done, total), None, "a progress write", job_id
            )
        ),
        cancel=lambda: jobs.mark_canceled(job_id),
        cleanup=lambda: drop_inputs_when_done(ctx, job_id),
    )
    result = run_engine(
        model, x, params, task.job.seed, progress, should_cancel, _memory_budget(ctx)
    )
    outage.tolerant(
        lambda: record_result_samples(jobs.redis, result["results"], result["provenance"]),
        None,
        "counting the samples drawn",
        job_id,
    )
    result["provenance"]["model_id"] = params.model_id
    label_rows(result["results"], task.labels)
    if task.labels is not None:
        result.update(label_metrics(result["results"], params.mode, task.radii))
    return result


def _memory_budget(ctx: WorkerContext) -> int | None:
    """A batch's memory budget in bytes (None: the engine's share of the free device memory)."""
    return ctx.settings.batch_memory_bytes or None


def saved_inputs(ctx: WorkerContext, job_id: str, count: int) -> np.ndarray:
    """The inputs the API saved for ``job_id`` (``DATA_DIR/jobs/<id>/inputs.npy``) as float32 in
    [0, 1]: 8-bit images were saved as uint8 pixels and are scaled here by the API's own rule
    (images.to_unit: / 255 in float32), so they are certified exactly as if the API had scaled
    them. InputError when they are not there, or are not the ``count`` inputs the record speaks
    of."""
    try:
        x = np.load(job_inputs(ctx.settings.jobs_dir, job_id), allow_pickle=False)
    except (
        OSError,
        ValueError,
        EOFError,
    ):  # missing, unreadable, a pickle, a link out of the data dir
        raise InputError(
            f"the saved inputs of job {job_id} are missing from the data dir "
            f"(jobs/{job_id}/inputs.npy)"
        ) from None
    if x.ndim < 1 or len(x) != count:
        raise InputError(
            f"the saved inputs of job {job_id} are not the {count} inputs its record names"
        )
    return to_unit(x) if x.dtype == np.uint8 else x


def run_dataset_chunk(
    ctx: WorkerContext, job_id: str, task: ChunkTask, worker: str
) -> dict[str, Any]:
    """Run chunk ``task.index`` of a dataset job; its outcome (rows and provenance)."""
    ledger = ctx.ledger
    should_stop, progress = watchdog.batches(
        lambda: outage.tolerant(
            lambda: ledger.should_stop(job_id), False, "a cancel check", job_id
        ),
        throttled(
            lambda done, total: outage.tolerant(
                lambda: ledger.set_progress(job_id, task.index, done),
                None,
                "a progress write",
                job_id,
            )
        ),
        cancel=lambda: ledger.jobs.mark_canceled(job_id),
    )
    outcome = run_chunk(
        ready_model(ctx, task.job.params),
        task,
        ctx.datasets,
        worker,
        progress,
        should_stop,
        _memory_budget(ctx),
        keep=lambda rows: ledger.jobs.keep_samples(job_id, rows),
    )
    outage.tolerant(
        lambda: record_result_samples(ledger.redis, outcome["rows"], outcome["provenance"]),
        None,
        "counting the samples drawn",
        job_id,
    )
    return outcome


def complete_chunk(ctx: WorkerContext, job_id: str, task: ChunkTask, worker: str) -> None:
    """Run a chunk and keep its outcome; when every chunk has one, combine them into the result.

    Any chunk task that finds all outcomes stored may combine them (a redelivered last chunk
    too); the record turns succeeded once, whoever wins, so no lock is needed. Storing the
    outcome, combining and clearing are each tried again while Redis is away (outage.persist).
    """
    ledger = ctx.ledger
    outcome = run_dataset_chunk(ctx, job_id, task, worker)
    stored = outage.persist(
        lambda: ledger.store(job_id, task.index, outcome),
        f"storing the outcome of chunk {task.index}",
        job_id,
    )
    if stored is None or stored < task.dataset.chunks:
        return
    if outage.persist(lambda: combine(ctx, job_id, task), "recording the job's result", job_id):
        outage.persist(lambda: ledger.clear(job_id), "clearing the chunk outcomes", job_id)


def combine(ctx: WorkerContext, job_id: str, task: ChunkTask) -> bool:
    """Combine the stored chunk outcomes into the job's result; whether this call recorded it."""
    jobs = ctx.jobs
    record = jobs.get(job_id, rows=False)
    outcomes = ctx.ledger.results(job_id)
    if record is None or record.status != RUNNING or len(outcomes) < task.dataset.chunks:
        return (
            False  # canceled or failed meanwhile, or another chunk task combined and cleared them
        )
    elapsed = max(0.0, time.time() - (record.started_at or time.time()))
    return jobs.succeed(job_id, combine_chunks(task, outcomes, elapsed))


def admitted(ctx: WorkerContext, job_id: str, deliveries: int, what: str = "the job") -> bool:
    """Whether this delivery should run: not when ``deliveries`` is 0 (canceled, or finished by an
    earlier delivery), and not past the redelivery cap, where the job fails saying why."""
    if deliveries == 0:
        return False
    if deliveries > ctx.settings.max_deliveries:
        message = f"{what} was started {deliveries - 1} times and its worker died each time"
        jobs = ctx.jobs
        outage.persist(lambda: jobs.fail(job_id, message), "recording the job's failure", job_id)
        return False
    return True


def finish(ctx: WorkerContext, job_id: str, work: Callable[[], Any]) -> None:
    """Run ``work()`` as job ``job_id`` and record how it ended; never raises for job errors."""
    jobs = ctx.jobs
    if admitted(ctx, job_id, jobs.start(job_id)):

        def run() -> None:
            result = work()
            outage.persist(
                lambda: jobs.succeed(job_id, result), "recording the job's result", job_id
            )

        record_errors(ctx, job_id, run)


def record_errors(ctx: WorkerContext, job_id: str, work: Callable[[], Any]) -> None:
    """Run ``work()``; a cancellation or an error ends job ``job_id`` accordingly. The ending is
    tried again while Redis is away (outage.persist)."""
    jobs = ctx.jobs
    try:
        work()
    except Canceled:
        outage.persist(lambda: jobs.mark_canceled(job_id), "recording the cancellation", job_id)
    except (ModelError, InputError, DatasetFileError) as exc:
        _fail(ctx, job_id, str(exc))
    except SoftTimeLimitExceeded:
        _fail(ctx, job_id, f"the job exceeded the {ctx.settings.task_time_limit_s} s time limit")
    except Exception as exc:  # a bug or a broken runtime: record it, keep the worker alive
        log.exception("job %s failed", job_id)
        _fail(ctx, job_id, f"internal error: {type(exc).__name__}: {exc}")


def _fail(ctx: WorkerContext, job_id: str, error: str) -> None:
    jobs = ctx.jobs
    outage.persist(lambda: jobs.fail(job_id, error), "recording the job's failure", job_id)


def drop_inputs_when_done(ctx: WorkerContext, job_id: str) -> None:
    """Delete a job's folder of saved inputs once it has ended, and give back what they held of its
    key's storage quota; a job still in flight keeps them for the next delivery. Only
    ``DATA_DIR/jobs/<id>`` is ever removed, and not when it resolves elsewhere. While Redis is away
    nothing is removed, as whether the job ended is not known: the workers' sweep deletes them
    later (service/core/storage_quota.py)."""
    jobs, jobs_dir = ctx.jobs, ctx.settings.jobs_dir
    record = outage.tolerant(
        lambda: jobs.get(job_id, rows=False), _UNKNOWN, "the cleanup of the saved inputs", job_id
    )
    if record is _UNKNOWN:
        return
    if record is None or record.status in TERMINAL:
        outage.tolerant(
            lambda: drop_job_inputs(jobs.redis, jobs_dir, job_id),
            None,
            "giving back the storage quota of the saved inputs",
            job_id,
        )
