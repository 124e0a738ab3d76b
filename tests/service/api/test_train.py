"""Training jobs end to end: ``POST /v1/train`` on a real Redis, a trainer and a certify worker.

The session's worker consumes only the certify queue; this module starts a trainer that
consumes only ``train``, so a training job that succeeds went through its own queue. The
trained model is then certified by the session's worker through the API. Also: the API's
refusals, cancel, a queued job whose dataset was deleted, and a trainer killed with SIGKILL
mid-run that resumes from its checkpoint.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from smoothcert.service.api.train_schemas import ARCH_INPUTS, BUILTIN_DATASETS, check_fits
from smoothcert.service.core.queue import TRAIN_QUEUE
from tests.support.stack import stack_env, start_worker, stop_process, wait_job

TRAINER = "trainer@tests"
FAST = {"dataset": "digits", "method": "gaussian", "sigma": 0.25, "batch_size": 128, "seed": 3}


@pytest.fixture(scope="module")
def trainer(redis_url, data_dir) -> Iterator[subprocess.Popen]:
    """A worker that consumes only the ``train`` queue, ready once its heartbeat is in Redis."""
    log = data_dir / "trainer.log"
    proc, _ = start_worker(stack_env(redis_url, data_dir), log, TRAINER, "--queues", TRAIN_QUEUE)
    yield proc
    stop_process(proc)


def train(admin, **body) -> str:
    resp = admin.post("/v1/train", json={**FAST, **body})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    assert resp.headers["location"] == resp.json()["location"] == f"/v1/jobs/{job_id}"
    return job_id


def watch(client, job_id: str, until, timeout: float = 90.0) -> list[dict]:
    """Every record seen while polling the job, up to and including the first that ``until`` accepts."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(client.get(f"/v1/jobs/{job_id}").json())
        if until(seen[-1]):
            return seen
        time.sleep(0.05)
    pytest.fail(f"job {job_id}: condition not met within {timeout} s; last record {seen[-1]}")


def pool_children(pid: int) -> list[int]:
    """The worker's prefork pool processes (Linux)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if not children.exists():
        pytest.skip("needs /proc/PID/task/PID/children to find the worker's pool process")
    return [int(p) for p in children.read_text().split()]


# --- the request is checked in the API ---------------------------------------------------------


@pytest.mark.parametrize(
    "body, code, message",
    [
        ({"method": "adversarial"}, 422, "method must be one of gaussian, smoothed, smoothadv"),
        ({"sigma": 0}, 422, "greater than 0"),
        ({"sigma": -0.5}, 422, "greater than 0"),
        ({"epochs": 0}, 422, "epochs must be an integer >= 1"),
        ({"lr": 0}, 422, "lr must be a positive number"),
        ({"m": 0, "method": "smoothed"}, 422, "m must be an integer >= 1"),
        ({"arch": "vgg16"}, 422, "unknown architecture 'vgg16'"),
        ({"arch": "cifar_resnet20"}, 422, "cifar_resnet20 takes images of shape 3xanyxany"),
        ({"dataset": "0123456789abcdef"}, 404, "unknown dataset '0123456789abcdef'"),
        ({"learning_rate": 0.1}, 422, "learning_rate"),
    ],
)
def test_bad_requests_are_refused_with_a_message(admin, body, code, message):
    resp = admin.post("/v1/train", json={**FAST, **body})
    assert resp.status_code == code, resp.text
    assert message in str(resp.json()["detail"])


def test_training_needs_the_admin_key(client, anonymous):
    assert client.post("/v1/train", json=FAST).status_code == 403
    assert anonymous.post("/v1/train", json=FAST).status_code == 401


def test_the_api_tables_match_the_architectures_and_the_digits():
    from smoothcert.models.architectures import ARCHITECTURES, DEFAULT_INPUT_SHAPE
    from smoothcert.worker.data.datasets import load_digits

    assert set(ARCH_INPUTS) == set(ARCHITECTURES)
    for arch, takes in ARCH_INPUTS.items():
        assert all(want in (None, got) for want, got in zip(takes, DEFAULT_INPUT_SHAPE[arch])), arch
        check_fits(arch, list(DEFAULT_INPUT_SHAPE[arch]), 10, "x")
    digits = load_digits()
    assert BUILTIN_DATASETS["digits"] == {
        "input_shape": list(digits.input_shape),
        "num_classes": digits.num_classes,
    }


# --- the job ------------------------------------------------------------------------------------


def test_train_on_digits_then_certify_the_registered_model(admin, trainer, demo_paths):
    job_id = train(admin, epochs=2, name="digits-trained")
    seen = watch(admin, job_id, lambda r: r["status"] in ("succeeded", "failed", "canceled"))
    job = seen[-1]
    assert job["status"] == "succeeded", job["error"]
    assert job["kind"] == "train" and job["progress"] == {"done": 2, "total": 2, "unit": "epochs"}
    assert job["params"]["seed"] == 3 and job["params"]["dataset"] == "digits"
    # the epochs appeared one by one while the job ran
    running = [r for r in seen if r["status"] == "running" and r["result"]]
    assert running and all(
        len(r["result"]["history"]) == r["progress"]["done"] >= 1 for r in running
    )
    result = job["result"]
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    for epoch in result["history"]:
        assert (
            epoch["loss"] > 0
            and 0 <= epoch["noisy_accuracy"] <= 1
            and 0 <= epoch["test_noisy_accuracy"] <= 1
        )
    assert result["history"][1]["loss"] < result["history"][0]["loss"]
    assert result["metrics"]["test_noisy_accuracy"] > 0.5 and result["resumed_from"] == 0

    model = admin.get(f"/v1/models/{result['model_id']}").json()
    assert result["model_id"] in [m["id"] for m in admin.get("/v1/models").json()]
    assert (
        model["name"] == "digits-trained"
        and model["format"] == "safetensors"
        and model["arch"] == "digits_cnn"
    )
    assert (
        model["input_shape"] == [1, 8, 8] and model["num_classes"] == 10 and model["sigma"] == 0.25
    )
    assert len(model["normalization"]["mean"]) == 1 and len(model["sha256"]) == 64
    assert model["extra"]["method"] == "gaussian" and model["train_job"] == job_id

    x, y = np.load(demo_paths["test_x"])[:4], np.load(demo_paths["test_y"])[:4]
    resp = admin.post(
        "/v1/certify",
        json={
            "model_id": model["id"],
            "inputs": x.tolist(),
            "labels": y.tolist(),
            "sigma": 0.25,
            "n0": 20,
            "n": 200,
            "seed": 0,
        },
    )
    assert resp.status_code == 202, resp.text
    certified = wait_job(admin, resp.json()["job_id"])
    assert certified["status"] == "succeeded", certified["error"]
    assert len(certified["result"]["results"]) == 4


def test_cancel_a_running_job_and_a_queued_job_fails_when_its_dataset_is_gone(
    admin, trainer, data_dir
):
    long = train(admin, epochs=500)
    watch(admin, long, lambda r: r["status"] == "running")
    # queued behind it: a job on an uploaded dataset, which is deleted before the job starts
    x, y = np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32), np.arange(40) % 2
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    dataset = admin.post("/v1/datasets", files={"file": ("two.npz", buffer.getvalue())}).json()
    orphan = train(admin, dataset=dataset["id"], epochs=1)
    assert admin.delete(f"/v1/datasets/{dataset['id']}").status_code == 204

    assert admin.delete(f"/v1/jobs/{long}").status_code == 202
    canceled = wait_job(admin, long, timeout=30)
    assert canceled["status"] == "canceled" and canceled["progress"]["done"] < 500
    failed = wait_job(admin, orphan, timeout=30)
    assert (
        failed["status"] == "failed" and failed["error"] == f"dataset {dataset['id']} was deleted"
    )
    assert not (data_dir / "jobs" / long).exists(), "a finished job keeps no checkpoint"


def test_train_on_an_uploaded_dataset(admin, trainer):
    rng = np.random.default_rng(1)
    x = rng.random((60, 1, 8, 8), dtype=np.float32) * 0.2
    y = np.arange(60) % 3
    x[y == 1, :, :4] += 0.8  # three easy classes
    x[y == 2, :, 4:] += 0.8
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    dataset = admin.post("/v1/datasets", files={"file": ("three.npz", buffer.getvalue())}).json()
    job = wait_job(admin, train(admin, dataset=dataset["id"], epochs=2, batch_size=16), timeout=60)
    assert job["status"] == "succeeded", job["error"]
    model = admin.get(f"/v1/models/{job['result']['model_id']}").json()
    assert model["num_classes"] == 3 and model["input_shape"] == [1, 8, 8]
    assert (
        job["result"]["metrics"]["train_size"] == 60
        and job["result"]["metrics"]["test_size"] is None
    )


def test_a_killed_trainer_resumes_from_its_last_epoch(admin, trainer):
    job_id = train(admin, epochs=3)
    seen = watch(
        admin,
        job_id,
        lambda r: r["progress"]["done"] >= 1 or r["status"] not in ("queued", "running"),
    )
    assert seen[-1]["status"] == "running", seen[-1]
    assert seen[-1]["result"]["history"][0]["epoch"] == 1  # metrics visible while it runs
    [child] = pool_children(trainer.pid)
    os.kill(child, signal.SIGKILL)
    job = wait_job(admin, job_id, timeout=90)
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    assert result["deliveries"] == 2 and result["resumed_from"] >= 1
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert result["history"][0]["delivery"] == 1 and result["history"][-1]["delivery"] == 2
    assert job["progress"] == {"done": 3, "total": 3, "unit": "epochs"}
