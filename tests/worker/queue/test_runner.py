"""The job runner's plain functions on a worker context built as a worker builds it (a real Redis,
database 9 of the session's server, and a temporary data dir), called directly: no Celery worker,
no API. What the end-to-end tests see through HTTP is checked here at the function level: a job
runs from its record's typed contract to its rows, a dataset job's chunks combine into one result,
the redelivery cap, the inputs' cleanup, and what a pool process reports for /readyz."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from smoothcert.service.core.contract import (
    CertifyJob,
    CertifyParams,
    CertifyTask,
    ChunkTask,
    DatasetRange,
)
from smoothcert.service.core.jobs import new_job_id
from smoothcert.service.core.model_store import READY
from smoothcert.service.core.storage_quota import JobInputs, npy_bytes, storage_keys
from smoothcert.service.core.workers import PROCESSES_PREFIX
from smoothcert.worker.queue import liveness, runner
from tests.support.stack import worker_context


@pytest.fixture
def ctx(redis_url, tmp_path):
    with worker_context(redis_url, 9, tmp_path, device="cpu", max_deliveries=2) as ctx:
        yield ctx


@pytest.fixture
def model_id(ctx, demo_paths) -> str:
    """The demo model, stored and checked as the API and a check_model task leave it."""
    with open(demo_paths["safetensors"], "rb") as f:
        meta = ctx.models.add(f, "digits_cnn.safetensors", {"name": "digits"})
    found = runner.check_model(ctx, meta["id"])
    ctx.models.update(meta["id"], **found, status=READY)
    return meta["id"]


def params(model_id: str, **overrides) -> CertifyParams:
    fields = dict(sigma=0.25, n0=20, n=200, alpha=0.01, seed=7, runtime="torch", batch_size=64)
    return CertifyParams(model_id, **{**fields, **overrides})


def queued(ctx, job: CertifyJob) -> str:
    """A job recorded as the API records it (status queued)."""
    job_id = new_job_id()
    ctx.jobs.create(job_id, job.params.mode, job.record_params(), total=job.progress_total)
    return job_id


def saved(ctx, job_id: str, x: np.ndarray) -> None:
    folder = ctx.settings.jobs_dir / job_id
    folder.mkdir(parents=True)
    np.save(folder / "inputs.npy", x)


def test_a_job_runs_from_its_typed_record_to_labelled_rows_and_the_same_seed_gives_the_same_rows(
    ctx, model_id, demo_paths
):
    x, y = np.load(demo_paths["test_x"])[:3], np.load(demo_paths["test_y"])[:3]
    job = CertifyJob(params(model_id), len(x))
    rows = []
    for _ in range(2):
        job_id = queued(ctx, job)
        saved(ctx, job_id, x)
        task = CertifyTask(job, [int(v) for v in y], [0.0, 0.25])
        runner.finish(ctx, job_id, lambda: runner.run_job(ctx, job_id, task))
        runner.drop_inputs_when_done(ctx, job_id)
        record = ctx.jobs.get(job_id)
        assert record.status == "succeeded", record.error
        assert not (ctx.settings.jobs_dir / job_id).exists()  # a finished job's inputs are gone
        result = record.result
        assert [r["label"] for r in result["results"]] == [int(v) for v in y]
        assert [p["radius"] for p in result["certified_accuracy"]] == [0.0, 0.25]
        assert result["provenance"]["model_id"] == model_id
        assert result["provenance"]["seed"] == 7
        rows.append([(r["prediction"], r["radius"]) for r in result["results"]])
    assert rows[0] == rows[1]


def test_a_job_whose_inputs_are_missing_fails_saying_where_they_should_be(ctx, model_id):
    job = CertifyJob(params(model_id), 2)
    job_id = queued(ctx, job)
    runner.finish(ctx, job_id, lambda: runner.run_job(ctx, job_id, CertifyTask(job)))
    record = ctx.jobs.get(job_id)
    assert record.status == "failed"
    assert f"jobs/{job_id}/inputs.npy" in record.error


def test_a_dataset_jobs_chunks_combine_into_one_result_in_dataset_order(
    ctx, model_id, demo_paths, tmp_path
):
    x, y = np.load(demo_paths["test_x"])[:5], np.load(demo_paths["test_y"])[:5]
    npz = tmp_path / "d.npz"
    np.savez(npz, x=x, y=y)
    with open(npz, "rb") as f:
        dataset = ctx.datasets.add(
            f, "d.npz", "d", max_bytes=10**7, max_unpacked_bytes=10**7, owner="tester"
        )
    job = CertifyJob(params(model_id), 4, DatasetRange(dataset["id"], 1, None, 2, 2))
    job_id = queued(ctx, job)
    assert ctx.ledger.start(job_id, 0) == 1 and ctx.ledger.start(job_id, 1) == 1
    for index in (1, 0):  # the order chunks finish in does not matter
        task = ChunkTask.planned(job, index, dataset["sha256"], None)
        runner.complete_chunk(ctx, job_id, task, "worker-a")
    record = ctx.jobs.get(job_id)
    assert record.status == "succeeded", record.error
    assert [r["index"] for r in record.result["results"]] == [1, 2, 3, 4]
    assert [r["label"] for r in record.result["results"]] == [int(v) for v in y[1:5]]
    provenance = record.result["provenance"]
    assert [c["start"] for c in provenance["chunks"]] == [1, 3]
    assert provenance["dataset_sha256"] == dataset["sha256"] and provenance["skip"] == 1


def test_a_delivery_past_the_cap_fails_the_job_and_a_finished_one_is_not_admitted(ctx):
    job_id = new_job_id()
    ctx.jobs.create(job_id, "certify", {})
    assert runner.admitted(ctx, job_id, 2)
    assert not runner.admitted(ctx, job_id, 3)
    record = ctx.jobs.get(job_id)
    assert record.status == "failed"
    assert record.error == "the job was started 2 times and its worker died each time"
    assert not runner.admitted(ctx, job_id, 0)


def test_an_ended_jobs_inputs_are_deleted_and_give_back_their_storage_quota(ctx):
    x = np.zeros((3, 1, 8, 8), np.float32)
    job = CertifyJob(params("m"), len(x))
    job_id, inputs = queued(ctx, job), JobInputs(ctx.redis())
    ok, _ = inputs.reserve(
        "owner", job_id, npy_bytes(x), quota=1 << 20, stored=0, dataset_ids=[], ttl_ms=60_000
    )
    assert ok
    saved(ctx, job_id, x)
    runner.drop_inputs_when_done(ctx, job_id)  # still queued: kept for its delivery
    assert (ctx.settings.jobs_dir / job_id / "inputs.npy").exists()
    assert inputs.reserved() == {job_id}
    assert ctx.jobs.fail(job_id, "ended")
    runner.drop_inputs_when_done(ctx, job_id)
    assert not (ctx.settings.jobs_dir / job_id).exists()
    assert inputs.reserved() == set() and ctx.redis().hgetall(storage_keys("owner")[1]) == {}


def test_a_pool_process_reports_the_models_it_loaded_for_readyz(ctx, model_id):
    runner.loaded_model(ctx, ctx.models.get(model_id))  # loaded by the check: from the cache
    assert len(ctx.loaded_models) == 1
    liveness.report_process(device="cpu", ctx=ctx)
    entry = json.loads(
        ctx.redis().hget(PROCESSES_PREFIX + liveness.worker_name(), str(os.getpid()))
    )
    assert entry["device"] == "cpu"
    assert [m["id"] for m in entry["models"]] == [model_id]
