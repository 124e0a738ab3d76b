"""Denoiser training jobs end to end: ``POST /v1/train/denoiser`` on a real Redis and a trainer
that consumes only the ``train`` queue; the registered denoiser then forms a pipeline. Stability
without ``init`` trains its MSE stage first, and the job's progress counts both stages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from smoothcert.service.api.train_schemas import DenoiserTrainRequest
from smoothcert.service.core.queue import TRAIN_QUEUE
from smoothcert.service.core.train_config import TrainingError
from smoothcert.worker.training.denoiser import mse_stage
from tests.support.denoisers import random_denoiser
from tests.support.stack import stack_env, start_worker, stop_process, upload_model_file, wait_job

FAST = {
    "dataset": "digits",
    "objective": "mse",
    "sigma": 0.5,
    "epochs": 1,
    "depth": 3,
    "width": 8,
    "seed": 4,
}


@pytest.fixture(scope="module")
def trainer(redis_url, data_dir) -> Iterator[None]:
    proc, _ = start_worker(
        stack_env(redis_url, data_dir),
        data_dir / "denoiser-trainer.log",
        "dtrainer@tests",
        "--queues",
        TRAIN_QUEUE,
    )
    yield
    stop_process(proc)


@pytest.fixture(scope="module")
def uploaded_denoiser(admin, tmp_path_factory) -> dict:
    """A random DnCNN of FAST's depth and width."""
    path = random_denoiser(tmp_path_factory.mktemp("init") / "d.safetensors", depth=3, width=8)
    resp = upload_model_file(admin, path)
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_bad_denoiser_requests_are_refused_with_a_message(
    admin, client, demo_model, uploaded_denoiser
):
    for body, code, phrase in [
        ({"objective": "stability"}, 422, "stability objective needs the frozen classifier"),
        (
            {"objective": "stability", "classifier": "nosuchmodel"},
            404,
            "unknown classifier model 'nosuchmodel'",
        ),
        (
            {"objective": "stability", "classifier": uploaded_denoiser["id"]},
            422,
            "is a denoiser; the classifier must",
        ),
        ({"objective": "ssim"}, 422, "objective must be one of mse, stability"),
        ({"depth": 1}, 422, "depth must be an integer from 2 to 64"),
        ({"dataset": "nosuchdataset"}, 404, "unknown dataset"),
        ({"init": "nosuchmodel"}, 404, "unknown init denoiser 'nosuchmodel'"),
        ({"init": demo_model["id"]}, 422, "is not a denoiser; init must be"),
        (
            {"init": uploaded_denoiser["id"], "width": 9},
            422,
            "this run trains dncnn of depth 3 and width 9",
        ),
        (
            {
                "objective": "stability",
                "classifier": demo_model["id"],
                "init": uploaded_denoiser["id"],
                "mse_epochs": 2,
            },
            422,
            "a run given init starts from that denoiser instead",
        ),
        ({"mse_epochs": 1}, 422, "an mse run has none"),
        ({"batch_size": 0}, 422, "batch_size must be an integer from 1"),
    ]:
        got = admin.post("/v1/train/denoiser", json={**FAST, **body})
        assert got.status_code == code and phrase in str(got.json()["detail"]), (body, got.text)
    assert client.post("/v1/train/denoiser", json=FAST).status_code == 403


def test_a_trained_denoiser_is_registered_and_forms_a_pipeline(
    admin, trainer, demo_model, uploaded_denoiser
):
    resp = admin.post(
        "/v1/train/denoiser",
        json={
            **FAST,
            "objective": "stability",
            "classifier": demo_model["id"],
            "init": uploaded_denoiser["id"],
            "name": "digits-denoiser",
        },
    )
    assert resp.status_code == 202, resp.text
    job = wait_job(admin, resp.json()["job_id"], timeout=180)
    assert job["status"] == "succeeded", job["error"]
    assert job["kind"] == "train_denoiser" and job["progress"] == {
        "done": 1,
        "total": 1,
        "unit": "epochs",
    }
    assert job["params"]["classifier"] == demo_model["id"] and job["params"]["seed"] == 4
    result = job["result"]
    assert [h["epoch"] for h in result["history"]] == [1] and 0 <= result["metrics"][
        "test_denoised_accuracy"
    ] <= 1
    model = admin.get(f"/v1/models/{result['model_id']}").json()
    assert (
        model["kind"] == "denoiser" and model["name"] == "digits-denoiser" and model["sigma"] == 0.5
    )
    assert model["extra"]["training"]["classifier_sha256"] == demo_model["sha256"]
    assert model["extra"]["training"]["init_sha256"] == uploaded_denoiser["sha256"]
    resp = admin.post(
        "/v1/models/pipelines", json={"denoiser": model["id"], "classifier": demo_model["id"]}
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["parts"]["denoiser"]["sha256"] == model["sha256"]


def test_the_request_takes_each_objectives_schedule_unless_given():
    def config(**body):
        return DenoiserTrainRequest(dataset="digits", **body).config(seed=7)

    mse, stability = config(), config(objective="stability", classifier="c", epochs=5)
    assert (mse.batch_size, mse.lr, mse.mse_epochs, mse.total_epochs) == (128, 1e-3, 0, 20)
    assert (stability.batch_size, stability.lr, stability.mse_epochs) == (32, 3e-4, 5)
    assert stability.total_epochs == 10
    given = config(objective="stability", classifier="c", batch_size=64, lr=0.01, mse_epochs=3)
    assert (given.batch_size, given.lr, given.mse_epochs) == (64, 0.01, 3)
    assert config(objective="stability", classifier="c", init="d").mse_epochs == 0
    with pytest.raises(TrainingError, match="given init"):
        config(objective="stability", classifier="c", init="d", mse_epochs=1)


def test_stability_without_init_trains_its_mse_stage_first_and_counts_both(
    admin, trainer, demo_model
):
    resp = admin.post(
        "/v1/train/denoiser",
        json={**FAST, "objective": "stability", "classifier": demo_model["id"]},
    )
    assert resp.status_code == 202, resp.text
    job = wait_job(admin, resp.json()["job_id"], timeout=180)
    assert job["status"] == "succeeded", job["error"]
    # one MSE epoch (mse_epochs defaults to epochs), then one of stability
    assert job["progress"] == {"done": 2, "total": 2, "unit": "epochs"}
    params = job["params"]
    assert (params["batch_size"], params["lr"], params["mse_epochs"]) == (32, 3e-4, 1)
    history = job["result"]["history"]
    assert [(h["epoch"], h["epochs"], h["stage"]) for h in history] == [
        (1, 2, "mse"),
        (2, 2, "stability"),
    ]
    model = admin.get(f"/v1/models/{job['result']['model_id']}").json()
    stages = model["extra"]["training"]["stages"]
    derived = mse_stage(DenoiserTrainRequest(**{**FAST, "objective": "stability"}).config(4))
    assert [(s["objective"], s["epochs"], s["seed"]) for s in stages] == [
        ("mse", 1, derived.seed),
        ("stability", 1, 4),
    ]
    assert (stages[0]["batch_size"], stages[0]["lr"]) == (128, 1e-3)
    assert model["extra"]["training"]["init_sha256"] is None
