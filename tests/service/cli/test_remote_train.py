"""`smoothcert train|train-denoiser --url`: training on the real stack through the CLI, end to end.

A trainer process (a worker on the ``train`` queue alone) trains one epoch on the built-in
digits; the command follows the job's epochs, prints the trained model's id and downloads its
file (checked against its SHA-256), which the API then serves byte for byte.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator

import pytest

from smoothcert.service.cli.main import main
from smoothcert.service.client.service_client import ServiceClient
from smoothcert.service.core.queue import TRAIN_QUEUE
from tests.support.stack import ADMIN_KEY, USER_KEY, stack_env, start_worker, stop_process

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def trainer(redis_url, data_dir) -> Iterator[subprocess.Popen]:
    log = data_dir / "remote-trainer.log"
    proc, _ = start_worker(
        stack_env(redis_url, data_dir), log, "remote-trainer@tests", "--queues", TRAIN_QUEUE
    )
    yield proc
    stop_process(proc)


@pytest.fixture
def service(api_url, monkeypatch):
    monkeypatch.setenv("SMOOTHCERT_ADMIN_KEY", ADMIN_KEY)  # the key that may train
    monkeypatch.setenv("SMOOTHCERT_API_KEY", USER_KEY)
    return api_url


def test_train_on_the_service_prints_the_model_and_downloads_it(
    service, trainer, admin, tmp_path, capsys
):
    out = tmp_path / "trained.safetensors"
    argv = ["train", "--url", service, "--dataset", "digits", "--epochs", "1", "--sigma", "0.25"]
    code = main([*argv, "--seed", "3", "--name", "remote-digits", "--wait", "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    model_id = stdout.strip()
    model = admin.get(f"/v1/models/{model_id}").json()
    assert model["name"] == "remote-digits" and model["arch"] == "digits_cnn"
    assert model["format"] == "safetensors" and model["sigma"] == 0.25
    assert "submitted training job" in stderr and f"model {model_id}" in stderr
    # the file the command wrote is the one the service keeps, under the record's digest
    data = out.read_bytes()
    assert hashlib.sha256(data).hexdigest() == model["sha256"]
    served = admin.get(f"/v1/models/{model_id}/file")
    assert served.status_code == 200 and served.content == data
    assert f"{model_id}.safetensors" in served.headers["content-disposition"]
    # the job the command followed: one epoch, its config as given
    job_id = stderr.split("submitted training job ")[1].split()[0]
    job = admin.get(f"/v1/jobs/{job_id}").json()
    assert job["kind"] == "train" and job["progress"] == {"done": 1, "total": 1, "unit": "epochs"}
    assert job["params"]["seed"] == 3 and job["result"]["model_id"] == model_id


def test_train_denoiser_on_the_service_without_wait_prints_the_job(service, trainer, admin, capsys):
    argv = ["train-denoiser", "--url", service, "--sigma", "0.5", "--epochs", "1"]
    code = main([*argv, "--depth", "3", "--width", "8", "--seed", "4"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    job_id = stdout.strip()
    with ServiceClient(service, ADMIN_KEY) as client:
        record = client.wait(job_id, timeout=180, unit="epochs")
        assert record["status"] == "succeeded", record["error"]
        assert record["kind"] == "train_denoiser"
        params = record["params"]
        assert (params["depth"], params["width"], params["sigma"]) == (3, 8, 0.5)
        model = client.get_model(record["result"]["model_id"])
        assert model["kind"] == "denoiser"


def test_local_only_flags_are_refused_with_url(service, capsys, tmp_path):
    argv = ["train", "--url", service, "--epochs", "1"]
    assert main([*argv, "--checkpoint-dir", str(tmp_path)]) == 2
    assert "--checkpoint-dir: not with --url" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "needs --wait" in capsys.readouterr().err
    # and the service refuses what it refuses, as one line
    assert main([*argv, "--dataset", "no-such-dataset"]) == 2
    assert "unknown dataset 'no-such-dataset'" in capsys.readouterr().err
