"""Messages written straight to Redis, as by someone who reached it: the worker trusts none of them.

A sending-only Celery app (the API's, :func:`~smoothcert.service.core.queue.make_celery`) on the
session's Redis sends the real task names with crafted arguments to the session's worker. Paths
come from ids, never from a message; a message whose record is missing or says otherwise is
dropped with a JSON log line before any file is touched; a forged record cannot make the worker
read anything outside the data dir. After each attack the same worker runs a real job.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import redis

from smoothcert.service.core.contract import chunk_seed
from smoothcert.service.core.job_chunks import ChunkLedger
from smoothcert.service.core.jobs import JobStore, new_job_id
from smoothcert.service.core.queue import (
    CERTIFY_CHUNK_TASK,
    CERTIFY_TASK,
    CHECK_MODEL_TASK,
    QUEUE,
    TRAIN_TASK,
    make_celery,
)
from smoothcert.service.core.settings import Settings
from tests.support.stack import wait_for, wait_job


@pytest.fixture(scope="module")
def sender(redis_url, data_dir):
    """The API's sending-only app, on the session's Redis."""
    return make_celery(Settings(redis_url=redis_url, data_dir=data_dir))


@pytest.fixture(scope="module")
def jobs(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield JobStore(client, ttl_s=600)
    client.close()


@pytest.fixture
def victim(tmp_path, demo_paths):
    """A folder outside the data dir with a file to keep and inputs the demo model takes."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "keep.txt").write_text("still here")
    np.save(folder / "inputs.npy", np.load(demo_paths["test_x"])[:2])
    np.save(folder / "x.npy", np.load(demo_paths["test_x"])[:2])
    np.save(folder / "y.npy", np.load(demo_paths["test_y"])[:2])
    return folder


def intact(folder) -> bool:
    return (folder / "keep.txt").read_text() == "still here" and len(
        np.load(folder / "inputs.npy")
    ) == 2


def certify_params(model_id: str, **extra) -> dict:
    """What the API records for a one-input certify job (certify.py:_params)."""
    return {
        "model_id": model_id,
        "mode": "certify",
        "sigma": 0.25,
        "n0": 10,
        "n": 50,
        "alpha": 0.001,
        "bound": "clopper-pearson",
        "batch_size": None,
        "seed": 3,
        "num_inputs": 2,
        **extra,
    }


def dropped_lines(data_dir, job_id: str) -> list[dict]:
    """The worker's JSON log lines saying it dropped a message for ``job_id``."""
    lines = []
    for line in (data_dir / "worker.log").read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(entry, dict)
            and entry.get("message", "").startswith("dropped a ")
            and job_id in entry["message"]
        ):
            lines.append(entry)
    return lines


def wait_dropped(data_dir, job_id: str, count: int = 1) -> list[dict]:
    return wait_for(
        lambda: len(dropped_lines(data_dir, job_id)) >= count and dropped_lines(data_dir, job_id),
        60,
        f"the worker's log line about dropping job {job_id}'s message",
    )


def serves_a_real_job(client, demo_model, demo_paths) -> None:
    resp = client.post(
        "/v1/certify",
        json={
            "model_id": demo_model["id"],
            "sigma": 0.25,
            "n0": 10,
            "n": 50,
            "inputs": np.load(demo_paths["test_x"])[:1].tolist(),
        },
    )
    assert resp.status_code == 202, resp.text
    assert wait_job(client, resp.json()["job_id"])["status"] == "succeeded"


def test_a_message_without_a_record_is_dropped_and_touches_no_file(
    sender, jobs, victim, data_dir, worker, client, demo_model, demo_paths
):
    job_id = new_job_id()
    spec = {
        **certify_params(demo_model["id"]),
        "inputs_path": str(victim / "inputs.npy"),
        "labels": None,
        "radii": None,
    }
    sender.send_task(CERTIFY_TASK, args=[job_id, spec], task_id=job_id)
    # Before, a job id was a folder name: this one climbs out of DATA_DIR/jobs to the victim.
    climbing = os.path.relpath(victim, data_dir / "jobs")
    sender.send_task(CERTIFY_TASK, args=[climbing, spec], task_id=climbing)
    # The task name picks the code, not the queue: a training message on the certify queue.
    sender.send_task(
        TRAIN_TASK,
        args=[climbing, {"config": {}, "dataset": "digits", "name": None}],
        task_id=climbing,
        queue=QUEUE,
    )
    sender.send_task(CHECK_MODEL_TASK, args=[job_id, "../models"], task_id=job_id)

    [line] = wait_dropped(data_dir, f"{CERTIFY_TASK} message for job {job_id}")
    assert line["level"] == "WARNING" and line["role"] == "worker" and line["job_id"] == job_id
    assert line["message"].endswith(
        f"there is no record of job {job_id}; nothing was run and no file was touched"
    )
    assert wait_dropped(data_dir, climbing, 2)[0]["message"].count("is not a job id") == 1
    assert (
        "there is no record"
        in wait_dropped(data_dir, f"{CHECK_MODEL_TASK} message for job {job_id}")[0]["message"]
    )
    assert intact(victim) and (victim / "x.npy").exists()
    assert jobs.get(job_id) is None and not jobs.redis.exists(JobStore.key(job_id))
    serves_a_real_job(client, demo_model, demo_paths)


def test_a_forged_record_cannot_make_the_worker_read_outside_the_data_dir(
    sender, jobs, victim, data_dir, worker, client, demo_model, demo_paths
):
    # A forged record and a message that agrees with it, naming the victim's inputs.
    job_id = new_job_id()
    params = certify_params(demo_model["id"])
    jobs.create(job_id, "certify", params, total=2 * 60)
    spec = {**params, "inputs_path": str(victim / "inputs.npy"), "labels": None, "radii": None}
    sender.send_task(CERTIFY_TASK, args=[job_id, spec], task_id=job_id)
    record = wait_job(client, job_id)
    assert record["status"] == "failed" and record["result"] is None
    assert record["error"] == (
        f"the saved inputs of job {job_id} are missing from the data dir (jobs/{job_id}/inputs.npy)"
    )

    # The same with DATA_DIR/jobs/<id> a link to the victim: resolved, found outside, refused, and
    # not removed when the job ends.
    linked = new_job_id()
    (data_dir / "jobs").mkdir(exist_ok=True)
    (data_dir / "jobs" / linked).symlink_to(victim, target_is_directory=True)
    jobs.create(linked, "certify", params, total=2 * 60)
    sender.send_task(CERTIFY_TASK, args=[linked, {**spec, "inputs_path": None}], task_id=linked)
    record = wait_job(client, linked)
    assert (
        record["status"] == "failed"
        and record["result"] is None
        and "missing from the data dir" in record["error"]
    )
    assert (data_dir / "jobs" / linked).is_symlink() and intact(victim)

    # A message whose parameters are not its record's is dropped; the job stays as it was.
    other = new_job_id()
    jobs.create(other, "certify", params, total=2 * 60)
    sender.send_task(CERTIFY_TASK, args=[other, {**spec, "n": 100_000}], task_id=other)
    sender.send_task(CERTIFY_TASK, args=[other, {**spec, "mode": "predict"}], task_id=other)
    sender.send_task(CERTIFY_CHUNK_TASK, args=[other, {**spec, "chunk": 0}], task_id=f"{other}.0")
    lines = [e["message"] for e in wait_dropped(data_dir, other, 3)]
    assert any(
        m.endswith(
            "its parameters differ from the job record's: n; nothing was run and no file was touched"
        )
        for m in lines
    )
    assert any("its parameters differ from the job record's: mode" in m for m in lines)
    assert any(f"job {other} is not a dataset job" in m for m in lines)
    assert jobs.get(other).status == "queued" and jobs.get(other).deliveries == 0
    assert intact(victim)
    serves_a_real_job(client, demo_model, demo_paths)


def test_a_chunk_message_cannot_name_a_dataset_outside_the_store(
    sender, jobs, victim, data_dir, worker, client, demo_model, demo_paths
):
    ledger = ChunkLedger(jobs)
    base = certify_params(demo_model["id"], skip=0, limit=None, chunk_size=2, chunks=1)

    def chunk_message(params: dict, **extra) -> dict:
        return {
            **params,
            "dataset_sha256": "0" * 64,
            "radii": None,
            "chunk": 0,
            "start": 0,
            "stop": 2,
            "chunk_seed": chunk_seed(params["seed"], 0),
            **extra,
        }

    # No record: dropped.
    ghost = new_job_id()
    params = {**base, "dataset_id": os.path.relpath(victim, data_dir / "datasets")}
    sender.send_task(
        CERTIFY_CHUNK_TASK,
        args=[ghost, chunk_message(params, x_path=str(victim / "x.npy"))],
        task_id=f"{ghost}.0",
    )
    assert "there is no record" in wait_dropped(data_dir, ghost)[0]["message"]

    # Forged records whose dataset is the victim: by a climbing id, and by a link in the store.
    (data_dir / "datasets").mkdir(exist_ok=True)
    (data_dir / "datasets" / "linkedvictim").symlink_to(victim, target_is_directory=True)
    (victim / "meta.json").write_text(
        json.dumps({"id": "linkedvictim", "num_inputs": 2, "sha256": "0" * 64})
    )
    for dataset_id in (params["dataset_id"], "linkedvictim"):
        job_id = new_job_id()
        forged = {**base, "dataset_id": dataset_id}
        jobs.create(job_id, "certify", forged, total=2 * 60)
        sender.send_task(
            CERTIFY_CHUNK_TASK, args=[job_id, chunk_message(forged)], task_id=f"{job_id}.0"
        )
        record = wait_job(client, job_id)
        assert record["status"] == "failed" and record["result"] is None
        assert record["error"] == f"dataset {dataset_id} was deleted"
        assert ledger.results(job_id) == {}
    assert intact(victim)

    # A chunk whose range or seed is not what the record gives is dropped.
    job_id = new_job_id()
    forged = {**base, "dataset_id": "linkedvictim"}
    jobs.create(job_id, "certify", forged, total=2 * 60)
    sender.send_task(
        CERTIFY_CHUNK_TASK,
        args=[job_id, {**chunk_message(forged), "stop": 10**9}],
        task_id=f"{job_id}.0",
    )
    sender.send_task(CERTIFY_CHUNK_TASK, args=[job_id, chunk_message(forged)], task_id=job_id)
    lines = [e["message"] for e in wait_dropped(data_dir, job_id, 2)]
    assert any("its stop differ from what the job record gives for chunk 0" in m for m in lines)
    assert any(f"is not {job_id}.0, the id of chunk 0" in m for m in lines)
    assert jobs.get(job_id).status == "queued"
    serves_a_real_job(client, demo_model, demo_paths)
