"""Celery tasks: thin wrappers that unpack a message, call the engine and store the outcome.

Messages carry ids and paths only (the inputs wait in ``DATA_DIR/jobs/<id>/``). Every outcome
lands in the job record (:mod:`smoothcert.service.jobs`); nothing is returned to Celery. A task
runs again after its worker died (late acks), at most ``max_deliveries`` times; running the same
job again gives the same answer because the seed is part of the message.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import redis
from celery.exceptions import SoftTimeLimitExceeded

from smoothcert.models.loaders import load_model
from smoothcert.models.metadata import ModelError
from smoothcert.models.store import ModelStore
from smoothcert.service.analyze import DEFAULT_RADII
from smoothcert.service.jobs import TERMINAL, JobStore
from smoothcert.worker import engine
from smoothcert.worker.celery_app import CERTIFY_TASK, CHECK_MODEL_TASK, app, settings

log = logging.getLogger(__name__)
MODEL_CACHE_SIZE = 4
_models: OrderedDict[tuple[str, str], Any] = OrderedDict()  # (id, sha256) -> classifier, per process
_clients: dict[str, Any] = {}


def job_store() -> JobStore:
    """This process's JobStore (one Redis connection pool, created after the fork)."""
    if "jobs" not in _clients:
        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=30)
        _clients["jobs"] = JobStore(client, ttl_s=settings.job_ttl_s)
    return _clients["jobs"]


def load_stored_model(store: ModelStore, meta: dict[str, Any]):
    """Load a stored model with its recorded fields; the last few stay loaded in this process."""
    key = (meta["id"], meta["sha256"])
    if key in _models:
        _models.move_to_end(key)
    else:
        while len(_models) >= MODEL_CACHE_SIZE:
            _models.popitem(last=False)
        _models[key] = load_model(
            store.weights_path(meta["id"]), device=settings.device, arch=meta.get("arch"),
            input_shape=meta.get("input_shape"), num_classes=meta.get("num_classes"),
            normalization=meta.get("normalization"), class_names=meta.get("class_names"),
            sigma=meta.get("sigma"), name=meta.get("name"))
    return _models[key]


def check_model(model_id: str) -> dict[str, Any]:
    """Load a pending model (the loader runs it on one batch); return what the loader found out.

    Raises ModelError (one line) when the file cannot be loaded or does not fit its metadata.
    """
    store = ModelStore(settings.models_dir)
    meta = store.get(model_id, include_pending=True)
    if meta is None:
        raise ModelError(f"model {model_id} disappeared before it was checked")
    model = load_stored_model(store, meta)
    found = model.info.to_dict()
    found.pop("sha256", None)
    return {**found, "runtime": model.runtime, "provider": model.provider}


def certified_accuracy(results: list[dict], labels: list[int], radii) -> list[dict[str, float]]:
    """Share of inputs predicted right with radius ≥ r, for each r in ``radii``."""
    radius = np.array([r["radius"] if r["prediction"] == y else -1.0 for r, y in zip(results, labels)])
    return [{"radius": float(r), "accuracy": float((radius >= r).mean())} for r in radii]


def run_job(job_id: str, spec: dict[str, Any], jobs: JobStore) -> dict[str, Any]:
    """Run a certify/predict job described by ``spec`` (the message) and return its result."""
    store = ModelStore(settings.models_dir)
    meta = store.get(spec["model_id"])
    if meta is None:
        raise ModelError(f"model {spec['model_id']} was deleted")
    model = load_stored_model(store, meta)
    x = np.load(spec["inputs_path"], allow_pickle=False)
    labels = spec.get("labels")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] > 0.25:
            last[0] = now
            jobs.set_progress(job_id, done, total)

    common = dict(batch_size=spec.get("batch_size"), seed=spec["seed"], progress=progress,
                  should_cancel=lambda: jobs.cancel_requested(job_id))
    if spec["mode"] == "predict":
        run = engine.predict(model, x, spec["sigma"], n=spec["n"], alpha=spec["alpha"], **common)
    else:
        run = engine.certify(model, x, spec["sigma"], n0=spec["n0"], n=spec["n"], alpha=spec["alpha"],
                             bound=spec["bound"], **common)
    result = run.to_dict()
    result["provenance"]["model_id"] = meta["id"]
    for i, row in enumerate(result["results"]):
        row["label"] = None if labels is None else int(labels[i])
    if labels is not None and spec["mode"] == "certify":
        result["certified_accuracy"] = certified_accuracy(result["results"], labels,
                                                          spec.get("radii") or DEFAULT_RADII)
    elif labels is not None:
        rows = result["results"]
        result["accuracy"] = float(np.mean([r["prediction"] == y for r, y in zip(rows, labels)]))
    return result


def _finish(job_id: str, jobs: JobStore, work) -> None:
    """Run ``work()`` as job ``job_id`` and record how it ended; never raises for job errors."""
    deliveries = jobs.start(job_id)
    if deliveries == 0:
        return  # canceled while queued, or already finished by an earlier delivery
    if deliveries > settings.max_deliveries:
        jobs.fail(job_id, f"the job was started {deliveries - 1} times and its worker died each time")
        return
    try:
        jobs.succeed(job_id, work())
    except engine.Canceled:
        jobs.mark_canceled(job_id)
    except (ModelError, engine.InputError) as exc:
        jobs.fail(job_id, str(exc))
    except SoftTimeLimitExceeded:
        jobs.fail(job_id, f"the job exceeded the {settings.task_time_limit_s} s time limit")
    except Exception as exc:  # a bug or a broken runtime: record it, keep the worker alive
        log.exception("job %s failed", job_id)
        jobs.fail(job_id, f"internal error: {type(exc).__name__}: {exc}")


@app.task(name=CERTIFY_TASK)
def certify_task(job_id: str, spec: dict[str, Any]) -> None:
    """Certify or predict the inputs saved for ``job_id``; ``spec`` holds paths and parameters."""
    jobs = job_store()
    try:
        _finish(job_id, jobs, lambda: run_job(job_id, spec, jobs))
    finally:
        record = jobs.get(job_id)
        if record is None or record.status in TERMINAL:  # keep the inputs for a redelivery
            shutil.rmtree(Path(spec["inputs_path"]).parent, ignore_errors=True)


@app.task(name=CHECK_MODEL_TASK)
def check_model_task(job_id: str, model_id: str) -> None:
    """Load and try a freshly uploaded model; the API waits for this job's record."""
    jobs = job_store()
    _finish(job_id, jobs, lambda: check_model(model_id))

