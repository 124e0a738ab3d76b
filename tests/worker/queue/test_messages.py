"""The message checks on their own, against records on a real Redis (database 6 of the session's
server): what the API sends passes, and each way a message can disagree with its record is a
:class:`Dropped` that says which. The end-to-end attacks are in test_crafted_messages.py."""

from __future__ import annotations

import pytest

from smoothcert.service.core.contract import CertifyJob, CertifyTask, chunk_seed
from smoothcert.service.core.dataset_store import DatasetStore
from smoothcert.service.core.jobs import JobStore, new_job_id
from smoothcert.worker.queue.messages import (
    Dropped,
    certify_task,
    check_model_message,
    chunk_task,
    train_task,
)
from tests.support.stack import scratch_db

PARAMS = {
    "model_id": "m1",
    "mode": "certify",
    "sigma": 0.25,
    "n0": 10,
    "n": 50,
    "alpha": 0.001,
    "bound": "clopper-pearson",
    "batch_size": None,
    "seed": 3,
    "num_inputs": 2,
    "target_radius": 0.5,
    "runtime": "auto",
    "precision": "float32",
}


@pytest.fixture
def jobs(redis_url):
    with scratch_db(redis_url, 6) as client:
        yield JobStore(client, ttl_s=600)


def recorded(jobs: JobStore, kind: str, params: dict) -> str:
    job_id = new_job_id()
    jobs.create(job_id, kind, params)
    return job_id


def test_the_api_message_of_a_certify_job_passes_with_its_labels(jobs):
    job_id = recorded(jobs, "certify", PARAMS)
    message = {**PARAMS, "labels": [1, 2], "radii": [0, 0.5]}  # as certify.py sends it
    task = certify_task(jobs, job_id, job_id, message)
    assert task == CertifyTask(CertifyJob.from_record_params(PARAMS), [1, 2], [0, 0.5])
    assert task.to_message() == {**PARAMS, "labels": [1, 2], "radii": [0, 0.5]}
    legacy = {**message, "inputs_path": "/etc/passwd"}  # an older API's path: never used
    assert "inputs_path" not in certify_task(jobs, job_id, job_id, legacy).to_message()


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"labels": [1]}, "its labels are not 2 integers"),
        ({"labels": [1, "2"]}, "its labels are not 2 integers"),
        ({"radii": [-1]}, "its radii are not a list of finite non-negative numbers"),
        ({"sigma": 0.5, "n": 1}, "its parameters differ from the job record's: n, sigma"),
        ({"target_radius": None}, "differ from the job record's: target_radius"),
        ({"extra": 1}, "differ from the job record's: extra"),
        ({"runtime": "torch"}, "differ from the job record's: runtime"),
    ],
)
def test_a_certify_message_unlike_its_record_is_dropped(jobs, change, reason):
    job_id = recorded(jobs, "certify", PARAMS)
    with pytest.raises(Dropped, match=reason):
        certify_task(jobs, job_id, job_id, {**PARAMS, "labels": None, "radii": None, **change})


def test_ids_kinds_and_task_ids_must_be_the_records(jobs):
    job_id = recorded(jobs, "train", {"x": 1})
    message = {**PARAMS, "labels": None, "radii": None}
    for args, reason in [
        ((job_id, job_id), f"job {job_id} is a train job, not certify or predict"),
        (("f" * 36, "f" * 36), "is not a job id"),
        ((new_job_id(), job_id), "is not its job id"),
        ((None, new_job_id()), "there is no record of job"),
    ]:
        task_id, given = args
        with pytest.raises(Dropped, match=reason):
            certify_task(jobs, task_id, given, message)
    with pytest.raises(Dropped, match="is not a job id"):
        certify_task(jobs, None, ["not", "a", "string"], message)
    with pytest.raises(Dropped, match="parameters are not a JSON object"):
        certify_task(jobs, None, recorded(jobs, "certify", PARAMS), "spec")


def test_check_model_and_train_messages_must_match_their_records(jobs):
    check = recorded(jobs, "check_model", {"model_id": "abc"})
    assert check_model_message(jobs, check, check, "abc") == "abc"
    with pytest.raises(Dropped, match="checks model 'abc', not '../x'"):
        check_model_message(jobs, check, check, "../x")
    config = {"arch": "digits_cnn", "epochs": 2, "seed": 1}
    train = recorded(jobs, "train", {"dataset": "digits", "name": None, **config})
    spec = {"config": config, "dataset": "digits", "name": None}
    assert train_task(jobs, train, train, spec).to_message() == spec
    with pytest.raises(Dropped, match="differ from the job record's"):
        train_task(jobs, train, train, {**spec, "dataset": "d1"})
    with pytest.raises(Dropped, match="not a training job's"):
        train_task(jobs, train, train, {**spec, "path": "/tmp"})


def test_a_chunk_must_be_the_one_its_record_gives(jobs, tmp_path):
    datasets = DatasetStore(tmp_path)
    (tmp_path / "ds1").mkdir()
    datasets.write("ds1", {"id": "ds1", "sha256": "a" * 64, "num_inputs": 5})
    params = {
        **PARAMS,
        "num_inputs": 5,
        "dataset_id": "ds1",
        "skip": 2,
        "limit": 5,
        "chunk_size": 2,
        "chunks": 3,
    }
    job_id = recorded(jobs, "certify", params)
    spec = {
        **params,
        "dataset_sha256": "a" * 64,
        "radii": None,
        "chunk": 2,
        "start": 6,
        "stop": 7,
        "chunk_seed": chunk_seed(3, 2),
    }
    task = chunk_task(jobs, datasets, f"{job_id}.2", job_id, spec)
    assert (task.index, task.start, task.stop, task.chunk_seed) == (2, 6, 7, chunk_seed(3, 2))
    assert task.to_message() == spec
    for change, reason in [
        ({"chunk": 3}, "chunk 3 is not one of the job's 3 chunks"),
        ({"chunk": True}, "is not one of the job's 3 chunks"),
        ({"start": 0}, "its start differ from what the job record gives"),
        ({"chunk_seed": 3}, "its chunk_seed differ"),
        ({"dataset_sha256": "b" * 64}, "its dataset_sha256 is not that of dataset ds1"),
        ({"skip": 0}, "differ from the job record's: skip"),
    ]:
        with pytest.raises(Dropped, match=reason):
            chunk_task(
                jobs, datasets, f"{job_id}.{change.get('chunk', 2)}", job_id, {**spec, **change}
            )
    with pytest.raises(Dropped, match=f"is not {job_id}.2, the id of chunk 2"):
        chunk_task(jobs, datasets, job_id, job_id, spec)
    with pytest.raises(Dropped, match="dataset job, which runs as chunks"):
        certify_task(jobs, job_id, job_id, spec)


def test_a_denoiser_training_message_must_be_one_and_go_to_its_own_task(jobs):
    config = {"arch": "dncnn", "epochs": 2, "seed": 1}
    named = {"dataset": "digits", "classifier": "c1", "init": None, "name": None}
    job_id = recorded(jobs, "train_denoiser", {**named, **config})
    message = {"config": config, **named}
    task = train_task(jobs, job_id, job_id, message, "train_denoiser")
    assert (task.classifier, task.init, task.to_message()) == ("c1", None, message)
    with pytest.raises(Dropped, match="is a train_denoiser job, not train"):
        train_task(jobs, job_id, job_id, message)  # the classifier training task
    with pytest.raises(Dropped, match="not a denoiser training job's"):
        train_task(jobs, job_id, job_id, {"config": config, "dataset": "digits"}, "train_denoiser")
    with pytest.raises(Dropped, match="differ from the job record's"):
        train_task(jobs, job_id, job_id, {**message, "classifier": "c2"}, "train_denoiser")
