"""The training job: a thin Celery task around :func:`smoothcert.worker.training.trainer.train`.

The message is ``(job_id, task)`` with ``task = {"config": TrainConfig.to_dict(), "dataset":
"digits" | an uploaded dataset id, "name": str | None}``; the API fixed the configuration and
its seed, so every delivery of the task rebuilds the same run. Each finished epoch is
checkpointed under ``DATA_DIR/jobs/<id>/checkpoint`` and appended to the job record's
``result.history`` (with ``progress.done`` = finished epochs), so a redelivered task (its worker
was killed) resumes from the last finished epoch rather than from zero; the history shows which
delivery trained each epoch. The cancel flag is polled before every batch. On success the model
is written by ``TrainResult.save`` into the model store, loaded once as an upload would be, and
registered ready; the result names its ``model_id``. The task runs on the ``train`` queue. A
message that does not match its job record is dropped, before any file is touched, as
:mod:`smoothcert.worker.queue.tasks` does.

A denoiser training job (``smoothcert.train_denoiser``, also on ``train``) is the same around
:func:`smoothcert.worker.training.denoiser.train_denoiser`: its task adds ``classifier`` and ``init``
(stored model ids or None: the frozen classifier, a denoiser to start from), which the worker
loads from the model store, and the denoiser it registers is
a ``kind: "denoiser"`` model, ready to be a pipeline's first part. A stability job without
``init`` trains in two stages (``config.mse_epochs`` of MSE, then ``config.epochs`` of
stability; :func:`smoothcert.worker.training.denoiser.train_denoiser`), and its progress counts
the epochs of both: ``progress.total`` is ``mse_epochs + epochs`` (set when the task starts; the
API recorded ``epochs``), ``progress.done`` the epochs finished over both stages, the MSE stage's
first. Each ``result.history`` entry names its ``stage`` (``mse`` or ``stability``) and counts
``epoch`` over the whole run. The MSE stage's seed is derived from the job's ``seed``
(:func:`~smoothcert.worker.training.denoiser.mse_stage`), so the same job parameters give the same
denoiser; the registered model's ``extra.training.stages`` lists both stages (objective, epochs,
batch size, learning rate, seed). Both stages are checkpointed under the job's ``checkpoint``
folder (the MSE stage in ``checkpoint/mse-stage``), so a redelivered task resumes either.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from smoothcert.models.denoisers import load_denoiser
from smoothcert.models.loaders import load_model, load_stored_model
from smoothcert.models.metadata import ModelError
from smoothcert.service.core.contract import TrainTask
from smoothcert.service.core.dataset_files import DatasetFileError
from smoothcert.service.core.dataset_store import DatasetMissing
from smoothcert.service.core.jobs import RUNNING, TERMINAL, JobStore
from smoothcert.service.core.jobs import job_folder as folder_of_job
from smoothcert.service.core.model_store import READY
from smoothcert.service.core.queue import TRAIN_DENOISER_TASK, TRAIN_TASK
from smoothcert.service.core.settings import Settings
from smoothcert.service.core.train_config import DenoiserConfig, TrainConfig, TrainingError
from smoothcert.worker.data.datasets import DIGITS, Dataset, load_digits
from smoothcert.worker.queue import context, messages
from smoothcert.worker.queue.celery_app import app
from smoothcert.worker.queue.runner import admitted
from smoothcert.worker.smoothing.sampling import Canceled
from smoothcert.worker.training.denoiser import DenoiserResult, train_denoiser
from smoothcert.worker.training.trainer import EpochMetrics, TrainResult, train

log = logging.getLogger(__name__)


def _settings() -> Settings:
    return context.current().settings


def job_folder(job_id: str) -> Path:
    """``DATA_DIR/jobs/<id>``; ValueError for anything but a job id, or a folder that resolves elsewhere."""
    return folder_of_job(_settings().jobs_dir, job_id)


def load_training_data(dataset: str) -> Dataset:
    """The built-in digits (train and test splits), or an uploaded dataset (no test split)."""
    if dataset == DIGITS:
        return load_digits()
    store = context.current().datasets
    meta = store.get(dataset)
    if meta is None:
        raise DatasetMissing(f"dataset {dataset} was deleted")
    x, y = store.load(dataset, 0, meta["num_inputs"])
    return Dataset(meta["name"], x, y)


def run_training(job_id: str, task: TrainTask, jobs: JobStore, delivery: int) -> dict[str, Any]:
    """Train (or resume) the run ``task`` describes, register the model; return the job's result."""
    config = TrainConfig.from_dict(dict(task.config))
    data = load_training_data(task.dataset)
    record = jobs.get(job_id)
    history: list[dict[str, Any]] = list(((record and record.result) or {}).get("history", []))

    def progress(metrics: EpochMetrics) -> None:
        history[:] = [h for h in history if h["epoch"] < metrics.epoch]
        history.append({**metrics.to_dict(), "delivery": delivery})
        # running -> running: a canceled or finished record is left alone
        jobs.transition(job_id, RUNNING, [RUNNING], done=metrics.epoch, result={"history": history})

    result = train(
        config,
        data,
        progress=progress,
        should_cancel=lambda: jobs.cancel_requested(job_id),
        checkpoint_dir=job_folder(job_id) / "checkpoint",
        device=_settings().device,
        name=task.name,
    )
    model = register_model(result, job_id)
    recorded = {h["epoch"]: h for h in history}
    return {
        "model_id": model["id"],
        "model_name": model.get("name"),
        "metrics": result.metrics,
        "history": [
            recorded.get(h.epoch, {**h.to_dict(), "delivery": None}) for h in result.history
        ],
        "resumed_from": result.resumed_from,
        "deliveries": delivery,
    }


def register_model(result: TrainResult, job_id: str) -> dict[str, Any]:
    """Store the trained model as a ready model (once per job, also when the task is redelivered)."""
    return _register(result, job_id, "model.safetensors", load_model)


def _register(
    result: TrainResult | DenoiserResult, job_id: str, filename: str, load
) -> dict[str, Any]:
    """Store a trained network's file as a ready model once per job (a redelivered task finds the
    first one), after the same check an upload gets: ``load`` the stored file (the loader runs it on
    its check batches); a file that fails is removed again. It belongs to the job's account and is
    private."""
    ctx = context.current()
    store = ctx.models
    for meta in store.list():
        if meta.get("train_job") == job_id:
            return meta
    path = result.save(job_folder(job_id) / filename)
    with open(path, "rb") as f:
        record = ctx.jobs.get(job_id, rows=False)
        owner = {"owner": record.owner} if record is not None and record.owner else {}
        fields = {"name": result.info.name, "train_job": job_id, **owner, "visibility": "private"}
        meta = store.add(f, path.name, fields)
    try:
        loaded = load(store.weights_path(meta["id"]), device=_settings().device)
        found = {
            k: v
            for k, v in loaded.info.to_dict().items()
            if v not in (None, {}) and k not in ("format", "sha256")
        }
        return store.update(
            meta["id"], **found, runtime=loaded.runtime, provider=loaded.provider, status=READY
        )
    except BaseException:
        store.delete(meta["id"])
        raise


def run_denoiser_training(
    job_id: str, task: TrainTask, jobs: JobStore, delivery: int
) -> dict[str, Any]:
    """Train (or resume) the denoiser ``task`` describes, register it; return the job's result."""
    config = DenoiserConfig.from_dict(dict(task.config))
    data = load_training_data(task.dataset)
    store = context.current().models
    loaded: dict[str, Any] = {}  # the classifier, and the TorchDenoiser to start from
    for role, model_id in (("classifier", task.classifier), ("init", task.init)):
        if model_id is not None:
            meta = store.get(model_id)
            if meta is None:
                raise ModelError(f"the {role} model {model_id} was deleted")
            loaded[role] = load_stored_model(store, meta, _settings().device)
    classifier = loaded.get("classifier")
    if task.init is not None:
        config = replace(config, mse_epochs=0)  # as train_denoiser does: no MSE stage
    # both stages' epochs: the API's record counted the last stage's alone
    jobs.transition(job_id, RUNNING, [RUNNING], total=config.total_epochs)

    history: list[dict[str, Any]] = []

    def progress(metrics) -> None:
        history[:] = [h for h in history if h["epoch"] < metrics.epoch] + [
            {**metrics.to_dict(), "delivery": delivery}
        ]
        jobs.transition(
            job_id,
            RUNNING,
            [RUNNING],
            done=metrics.epoch,
            total=metrics.epochs,
            result={"history": history},
        )

    result = train_denoiser(
        config,
        data,
        classifier,
        progress=progress,
        should_cancel=lambda: jobs.cancel_requested(job_id),
        checkpoint_dir=job_folder(job_id) / "checkpoint",
        device=_settings().device,
        name=task.name,
        init=loaded.get("init"),
    )
    model = register_denoiser(result, job_id)
    return {
        "model_id": model["id"],
        "model_name": model.get("name"),
        "metrics": result.metrics,
        "history": [h.to_dict() for h in result.history],
        "resumed_from": result.resumed_from,
        "deliveries": delivery,
    }


def register_denoiser(result: DenoiserResult, job_id: str) -> dict[str, Any]:
    """Store the trained denoiser as a ready model (once per job, also when the task is redelivered)."""
    return _register(result, job_id, "denoiser.safetensors", load_denoiser)


@app.task(name=TRAIN_TASK, bind=True)
def train_task(self, job_id: str, message: dict[str, Any]) -> None:
    """Train the model of job ``job_id``; every outcome lands in its record."""
    jobs = context.current().jobs
    trusted = messages.checked(
        self.name, job_id, lambda: messages.train_task(jobs, self.request.id, job_id, message)
    )
    if trusted is not None:
        _train_job(job_id, jobs, lambda delivery: run_training(job_id, trusted, jobs, delivery))


@app.task(name=TRAIN_DENOISER_TASK, bind=True)
def train_denoiser_task(self, job_id: str, message: dict[str, Any]) -> None:
    """Train the denoiser of job ``job_id``; every outcome lands in its record."""
    jobs = context.current().jobs
    trusted = messages.checked(
        self.name,
        job_id,
        lambda: messages.train_task(jobs, self.request.id, job_id, message, "train_denoiser"),
    )
    if trusted is not None:
        _train_job(
            job_id, jobs, lambda delivery: run_denoiser_training(job_id, trusted, jobs, delivery)
        )


def _train_job(job_id: str, jobs: JobStore, run) -> None:
    """Admit this delivery, run ``run(delivery)`` as the job and record its outcome; the job's
    folder (its checkpoint) is removed once the job has ended, kept for a redelivery otherwise."""
    try:
        delivery = jobs.start(job_id)
        if not admitted(context.current(), job_id, delivery):
            return
        _record_outcome(job_id, jobs, lambda: jobs.succeed(job_id, run(delivery)))
    finally:
        record = jobs.get(job_id)
        if record is None or record.status in TERMINAL:  # keep the checkpoint for a redelivery
            try:
                shutil.rmtree(job_folder(job_id), ignore_errors=True)
            except ValueError:
                log.warning(
                    "job %s: its folder resolves outside %s; left alone",
                    job_id,
                    _settings().jobs_dir,
                )


def _record_outcome(job_id: str, jobs: JobStore, work) -> None:
    """Run ``work()``; a cancellation or an error ends job ``job_id`` with a one-line message."""
    try:
        work()
    except Canceled:
        jobs.mark_canceled(job_id)
    except (TrainingError, ModelError, DatasetFileError) as exc:
        jobs.fail(job_id, (str(exc).strip().splitlines() or [type(exc).__name__])[0])
    except SoftTimeLimitExceeded:
        jobs.fail(
            job_id,
            f"the job exceeded the {_settings().task_time_limit_s} s time limit "
            "(SMOOTHCERT_TASK_TIME_LIMIT_S)",
        )
    except Exception as exc:  # a bug or a broken runtime: record it, keep the worker alive
        log.exception("training job %s failed", job_id)
        jobs.fail(job_id, f"internal error: {type(exc).__name__}: {exc}")
