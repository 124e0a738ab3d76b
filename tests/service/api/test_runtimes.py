"""The runtime of a job: auto by default (timed when the model is uploaded), pinned on request,
torch refused for an ONNX model, recorded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smoothcert.models.architectures import build_network
from smoothcert.models.metadata import ModelInfo
from smoothcert.models.safetensors_io import save_safetensors_model
from tests.support.stack import timed_runtimes, upload_model_file, wait_job

CANDIDATES = {"torch", "torch-channels-last", "onnxruntime"}


@pytest.fixture(scope="module")
def inputs(demo_paths):
    return np.load(demo_paths["test_x"])[:2].tolist()


def _run(client, **body):
    resp = client.post("/v1/certify", json={"sigma": 0.25, "n0": 10, "n": 100, "seed": 0, **body})
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    return job["result"]["provenance"]


def test_a_job_runs_in_the_fastest_runtime_by_default_and_records_it(client, demo_model, inputs):
    provenance = _run(client, model_id=demo_model["id"], inputs=inputs)
    choice = provenance["runtime_choice"]
    assert choice["requested"] == "auto" and choice["chosen"] in CANDIDATES
    assert choice["how"] in ("auto, measured", "auto, from the cache")
    assert provenance["runtime"] == (
        "onnxruntime" if choice["chosen"] == "onnxruntime" else "torch"
    )
    assert provenance["provider"] and provenance["precision"] == "float32"


@pytest.mark.parametrize(
    "runtime, provider", [("torch", "cpu"), ("onnxruntime", "CPUExecutionProvider")]
)
def test_a_pinned_runtime_is_the_one_that_runs(client, demo_model, inputs, runtime, provider):
    provenance = _run(client, model_id=demo_model["id"], inputs=inputs, runtime=runtime)
    assert provenance["runtime"] == runtime and provenance["provider"] == provider
    assert provenance["runtime_choice"] == {
        "requested": runtime,
        "chosen": runtime,
        "how": "pinned",
        **(
            {"graph_sha256": provenance["runtime_choice"].get("graph_sha256")}
            if runtime == "onnxruntime"
            else {}
        ),
    }


def test_runtime_torch_on_an_onnx_model_is_422_and_auto_runs_it_in_onnxruntime(
    client, admin, demo_paths, inputs
):
    resp = upload_model_file(admin, demo_paths["onnx"])
    assert resp.status_code == 201, resp.text
    model_id = resp.json()["id"]
    refused = client.post(
        "/v1/certify",
        json={"model_id": model_id, "inputs": inputs, "sigma": 0.25, "runtime": "torch"},
    )
    assert refused.status_code == 422
    assert refused.json()["detail"] == (
        f"runtime torch needs a safetensors model; model {model_id} is ONNX, which "
        "runs in onnxruntime only: use runtime auto or onnxruntime"
    )
    provenance = _run(client, model_id=model_id, inputs=inputs)
    assert (
        provenance["runtime"] == "onnxruntime"
        and provenance["runtime_choice"]["chosen"] == "onnxruntime"
    )


def test_an_unknown_runtime_is_422_naming_the_allowed_ones(client, demo_model, inputs):
    resp = client.post(
        "/v1/certify",
        json={"model_id": demo_model["id"], "inputs": inputs, "sigma": 0.25, "runtime": "tensorrt"},
    )
    assert resp.status_code == 422
    text = str(resp.json()["detail"])
    assert "runtime" in text and all(name in text for name in ("auto", "torch", "onnxruntime"))


def test_a_bfloat16_job_runs_in_torch_and_records_its_precision(client, demo_model, inputs):
    provenance = _run(client, model_id=demo_model["id"], inputs=inputs, precision="bfloat16")
    assert provenance["precision"] == "bfloat16" and provenance["runtime"] == "torch"


@pytest.mark.parametrize(
    "body, phrase",
    [
        (
            {"precision": "float16"},
            "precision float16 needs a CUDA device and this server's workers run on the CPU",
        ),
        (
            {"precision": "bfloat16", "runtime": "onnxruntime"},
            "precision bfloat16 runs in torch only",
        ),
    ],
)
def test_a_precision_the_workers_cannot_run_is_422(client, demo_model, inputs, body, phrase):
    resp = client.post(
        "/v1/certify", json={"model_id": demo_model["id"], "inputs": inputs, "sigma": 0.25, **body}
    )
    assert resp.status_code == 422 and phrase in resp.json()["detail"]


def test_runtimes_are_timed_at_upload_so_the_first_job_finds_its_choice_cached(
    client, admin, inputs, data_dir, tmp_path
):
    # A digits_cnn of its own (seeded weights, so a sha256 no other test has timed).
    torch.manual_seed(20261207)
    path = save_safetensors_model(
        tmp_path / "fresh.safetensors",
        build_network("digits_cnn", 10),
        ModelInfo(format="safetensors", input_shape=[1, 8, 8], num_classes=10, arch="digits_cnn"),
    )
    resp = upload_model_file(admin, path)
    assert resp.status_code == 201, resp.text
    model = resp.json()
    before = timed_runtimes(data_dir, model["sha256"])
    provenance = _run(client, model_id=model["id"], inputs=inputs)
    # The job ran in the runtime timed at upload, and timed nothing itself: a measurement would
    # have written its own rates and time over the entry.
    assert timed_runtimes(data_dir, model["sha256"]) == before
    choice = provenance["runtime_choice"]
    assert choice["chosen"] == before["chosen"]
    assert choice["measured_samples_per_s"] == before["measured"]
    assert admin.delete(f"/v1/models/{model['id']}").status_code == 204
