"""The typed job contract (service/core/contract.py): it reads and writes the wire formats that
records and messages have always had, field for field, and its rules say what they refuse."""

from __future__ import annotations

import pytest

from smoothcert.service.core.contract import (
    CertifyJob,
    CertifyParams,
    CertifyTask,
    ChunkTask,
    ContractError,
    DatasetRange,
    DatasetRecord,
    ModelRecord,
    chunk_seed,
    message_job,
)
from smoothcert.service.core.params import DEFAULT_N

# A record's params exactly as the API has always written them (routes/certify.py before the
# contract), for an inputs job with a target radius and for a dataset job.
RECORD = {
    "model_id": "m1",
    "mode": "certify",
    "sigma": 0.25,
    "n0": 100,
    "n": 1000,
    "alpha": 0.001,
    "bound": "cohen",
    "batch_size": None,
    "seed": 42,
    "num_inputs": 3,
    "runtime": "auto",
    "precision": "float32",
    "target_radius": 0.5,
}
DATASET_RECORD = {
    **{k: v for k, v in RECORD.items() if k != "target_radius"},
    "num_inputs": 5,
    "dataset_id": "ds",
    "skip": 2,
    "limit": None,
    "chunk_size": 2,
    "chunks": 3,
}


def test_a_record_reads_into_a_job_and_writes_back_the_same_json_in_the_same_order():
    for record in (RECORD, DATASET_RECORD):
        job = CertifyJob.from_record_params(record)
        assert job.record_params() == record
        assert list(job.record_params()) == list(record)
    job = CertifyJob.from_record_params(RECORD)
    assert (job.params.target_radius, job.seed, job.first_row, job.total_samples) == (
        0.5,
        42,
        0,
        3 * 1100,
    )
    dataset = CertifyJob.from_record_params(DATASET_RECORD)
    assert dataset.dataset == DatasetRange("ds", 2, None, 2, 3)
    assert dataset.chunk_ranges() == [(2, 4), (4, 6), (6, 7)]


def test_a_record_from_before_runtimes_reads_as_torch_in_float32_and_its_message_so_too():
    legacy = {k: v for k, v in RECORD.items() if k not in ("runtime", "precision")}
    job = CertifyJob.from_record_params(legacy)
    assert (job.params.runtime, job.params.precision) == ("torch", "float32")
    assert message_job(legacy, ()) == job
    assert job.differences(CertifyJob.from_record_params(RECORD)) == ["runtime"]
    with pytest.raises(ContractError) as missing:
        message_job({k: v for k, v in RECORD.items() if k not in ("n", "seed")}, ())
    assert missing.value.fields == ["n", "seed"]


def test_unknown_and_missing_fields_are_named():
    with pytest.raises(ContractError) as unknown:
        CertifyJob.from_record_params({**RECORD, "inputs_path": "/etc/passwd"})
    assert unknown.value.fields == ["inputs_path"]
    with pytest.raises(ContractError) as half_dataset:
        CertifyJob.from_record_params({**RECORD, "dataset_id": "ds"})
    assert half_dataset.value.fields == ["skip", "limit", "chunk_size", "chunks"]
    with pytest.raises(ContractError, match="drawn before it is recorded"):
        CertifyJob(CertifyParams("m1", 0.25), 1)


def test_differences_name_the_fields_that_differ():
    job = CertifyJob.from_record_params(RECORD)
    other = CertifyJob.from_record_params({**RECORD, "sigma": 0.5, "target_radius": None})
    assert job.differences(other) == ["sigma", "target_radius"]
    assert job.differences(job) == []


def test_messages_carry_the_record_and_their_own_fields():
    job = CertifyJob.from_record_params(RECORD)
    task = CertifyTask(job, [1, 2, 3], [0.0, 0.5])
    assert task.to_message() == {**RECORD, "labels": [1, 2, 3], "radii": [0.0, 0.5]}
    dataset = CertifyJob.from_record_params(DATASET_RECORD)
    chunk = ChunkTask.planned(dataset, 2, "a" * 64, None)
    assert chunk.to_message() == {
        **DATASET_RECORD,
        "dataset_sha256": "a" * 64,
        "radii": None,
        "chunk": 2,
        "start": 6,
        "stop": 7,
        "chunk_seed": chunk_seed(42, 2),
    }
    assert message_job(chunk.to_message(), ChunkTask.MESSAGE_ONLY) == dataset
    with pytest.raises(IndexError):
        ChunkTask.planned(dataset, 3, None, None)


def test_a_client_sends_only_what_differs_from_the_defaults():
    assert CertifyParams("m1", 0.25).request_fields() == {"model_id": "m1", "sigma": 0.25}
    assert CertifyParams("m1", 0.25, n=DEFAULT_N, seed=0, mode="predict").request_fields() == {
        "model_id": "m1",
        "sigma": 0.25,
        "seed": 0,
        "mode": "predict",
    }
    assert CertifyParams("m1", 0.25, n0=10, n=20).samples_per_input == 30
    assert CertifyParams("m1", 0.25, n0=10, n=20, mode="predict").samples_per_input == 20


@pytest.mark.parametrize(
    "meta, runtime, precision, device, words",
    [
        ({"kind": "denoiser", "format": "safetensors"}, "auto", "float32", "cpu", "is a denoiser"),
        ({"format": "pipeline"}, "torch", "float32", "cpu", "is a pipeline"),
        ({"format": "onnx"}, "torch", "float32", "cpu", "runtime torch needs a safetensors"),
        ({"format": "onnx"}, "auto", "bfloat16", "cpu", "precision bfloat16 runs in torch only"),
        ({"format": "safetensors"}, "auto", "float16", "cpu", "float16 needs a CUDA device"),
        ({"format": "safetensors"}, "auto", "float16", "cuda", None),
        ({"format": "safetensors"}, "onnxruntime", "float32", "cpu", None),
    ],
)
def test_a_model_record_says_which_runtimes_and_precisions_fit_it(
    meta, runtime, precision, device, words
):
    model = ModelRecord.from_meta({"id": "m1", "input_shape": [1, 8, 8], "num_classes": 10, **meta})
    refusal = model.refusal(runtime, precision, device)
    assert refusal is None if words is None else words in refusal


def test_a_diffusion_denoiser_refuses_a_sigma_beyond_its_schedule():
    schedule = {"alphas_cumprod": [0.99, 0.9, 0.5]}  # sigma_t = sqrt((1 - a) / a): at most 1
    denoiser = ModelRecord.from_meta(
        {"id": "d1", "kind": "denoiser", "input_shape": [1, 8, 8], "extra": {"schedule": schedule}}
    )
    assert denoiser.sigma_refusal(0.5, "p1") is None
    assert denoiser.sigma_refusal(5.0, "p1").startswith("model p1: ")
    plain = ModelRecord.from_meta({"id": "d2", "kind": "denoiser", "input_shape": [1, 8, 8]})
    assert plain.sigma_refusal(5.0, "p1") is None


def test_a_dataset_record_says_whether_a_model_can_certify_it():
    meta = {"id": "ds", "num_inputs": 5, "input_shape": [1, 8, 8], "label_range": [0, 9]}
    dataset = DatasetRecord.from_meta({**meta, "sha256": "a" * 64})
    ten = ModelRecord.from_meta({"id": "m", "input_shape": [1, 8, 8], "num_classes": 10})
    assert dataset.refusal_for(ten) is None
    five = ModelRecord.from_meta({"id": "m", "input_shape": [1, 8, 8], "num_classes": 5})
    assert "labels up to 9" in dataset.refusal_for(five)
    wide = ModelRecord.from_meta({"id": "m", "input_shape": [3, 8, 8], "num_classes": 10})
    assert "holds inputs of shape [1, 8, 8]" in dataset.refusal_for(wide)
