"""A diffusion denoiser over HTTP on the real stack: uploaded as safetensors and as its ONNX (x_t, t)
form, both recorded as denoisers; registered in front of the demo classifier, a certify job through
the real worker gives the rows of `smoothcert certify CLASSIFIER --denoiser FILE` for the same seed,
and its provenance names the timestep the job's σ chose."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smoothcert.models.denoisers import load_denoiser
from smoothcert.models.diffusion import export_diffusion_onnx
from smoothcert.models.diffusion_schedule import largest_sigma, timestep_for_sigma
from smoothcert.models.metadata import ModelError
from smoothcert.models.pipeline import load_pipeline
from smoothcert.worker.smoothing.certify import certify
from tests.models.test_diffusion import random_diffusion
from tests.support.cli_rows import assert_same_certificates, cli_certify
from tests.support.stack import upload_model_file, wait_job

JOB = {"sigma": 0.5, "n0": 20, "n": 200, "alpha": 0.001, "batch_size": 100, "seed": 5}


@pytest.fixture(scope="module")
def diffusion_files(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("diffusion")
    path = random_diffusion(folder / "diffusion.safetensors")
    return {
        "safetensors": path,
        "onnx": export_diffusion_onnx(load_denoiser(path, device="cpu"), folder / "d.onnx"),
    }


@pytest.fixture(scope="module")
def uploaded(admin, diffusion_files) -> dict[str, dict]:
    records = {}
    for fmt, path in diffusion_files.items():
        resp = upload_model_file(admin, path)
        assert resp.status_code == 201, resp.text
        records[fmt] = resp.json()
    return records


def test_both_forms_of_a_diffusion_denoiser_are_recorded_as_denoisers(uploaded):
    for fmt, record in uploaded.items():
        assert record["kind"] == "denoiser" and record["format"] == fmt, record
        assert record["input_shape"] == [1, 8, 8] and record["num_classes"] is None


def test_a_diffusion_pipeline_job_gives_the_rows_of_certify_with_denoiser(
    admin, client, uploaded, diffusion_files, demo_model, demo_paths, tmp_path
):
    resp = admin.post(
        "/v1/models/pipelines",
        json={
            "denoiser": uploaded["safetensors"]["id"],
            "classifier": demo_model["id"],
            "visibility": "public",  # the user key's account certifies with it
        },
    )
    assert resp.status_code == 201, resp.text
    pipeline = resp.json()
    x = np.load(demo_paths["test_x"])[:6]
    resp = client.post(
        "/v1/certify", json={"model_id": pipeline["id"], "inputs": x.tolist(), **JOB}
    )
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"], timeout=120)
    assert job["status"] == "succeeded", job["error"]
    cli = cli_certify(demo_paths["safetensors"], diffusion_files["safetensors"], x, JOB, tmp_path)
    assert_same_certificates(job["result"]["results"], cli)
    schedule = load_denoiser(diffusion_files["safetensors"], device="cpu").alphas_cumprod
    part = job["result"]["provenance"]["model_parts"]["denoiser"]
    assert (
        part["id"] == uploaded["safetensors"]["id"]
        and part["sha256"] == uploaded["safetensors"]["sha256"]
    )
    assert (part["sigma"], part["timestep"]) == (0.5, timestep_for_sigma(schedule, 0.5))
    cli_provenance = json.loads((tmp_path / "cli.tsv.json").read_text())
    assert cli_provenance["model_parts"]["denoiser"]["timestep"] == part["timestep"]


def test_an_onnx_diffusion_pipeline_refuses_a_sigma_beyond_its_schedule(
    admin, client, uploaded, demo_model, demo_paths, diffusion_files
):
    resp = admin.post(
        "/v1/models/pipelines",
        json={
            "denoiser": uploaded["onnx"]["id"],
            "classifier": demo_model["id"],
            "visibility": "public",  # the user key's account certifies with it
        },
    )
    assert resp.status_code == 201, resp.text
    x = np.load(demo_paths["test_x"])[:2]
    pipeline = resp.json()
    newest = [j["id"] for j in client.get("/v1/jobs", params={"limit": 1}).json()["jobs"]]
    resp = client.post(
        "/v1/certify",
        json={"model_id": pipeline["id"], "inputs": x.tolist(), **{**JOB, "sigma": 2}},
    )
    assert (
        resp.status_code == 422
        and "beyond this diffusion model's schedule" in resp.json()["detail"]
    ), resp.text
    assert [
        j["id"] for j in client.get("/v1/jobs", params={"limit": 1}).json()["jobs"]
    ] == newest  # none queued
    # Past the API (a job queued before this check existed) the engine refuses the σ with the same words.
    model = load_pipeline(diffusion_files["onnx"], demo_paths["safetensors"], device="cpu")
    with pytest.raises(ModelError, match="beyond this diffusion model's schedule"):
        certify(model, x, 2.0, n0=10, n=20)


def test_records_leave_the_schedule_out_and_its_own_route_serves_it(
    admin, client, uploaded, diffusion_files, demo_model, data_dir
):
    alphas = load_denoiser(diffusion_files["safetensors"], device="cpu").alphas_cumprod
    listed = {m["id"]: m for m in client.get("/v1/models").json()}
    for record in uploaded.values():
        model_id = record["id"]
        answers = (record, listed[model_id], client.get(f"/v1/models/{model_id}").json())
        for answer in answers:  # the upload's answer, the listing, the record
            assert answer["extra"] and "schedule" not in answer["extra"]
        stored = json.loads((data_dir / "models" / model_id / "meta.json").read_text())
        assert len(stored["extra"]["schedule"]["alphas_cumprod"]) == len(alphas)  # kept for σ
        resp = client.get(f"/v1/models/{model_id}/schedule")
        assert resp.status_code == 200, resp.text
        served = resp.json()
        assert served["model_id"] == model_id and served["timesteps"] == len(alphas)
        assert np.allclose(served["schedule"]["alphas_cumprod"], alphas)
        assert served["largest_sigma"] == pytest.approx(largest_sigma(alphas))
    resp = admin.post(
        "/v1/models/pipelines",
        json={
            "denoiser": uploaded["safetensors"]["id"],
            "classifier": demo_model["id"],
            "visibility": "public",  # the user key's account certifies with it
        },
    )
    assert resp.status_code == 201, resp.text
    pipeline = resp.json()["id"]
    assert (
        client.get(f"/v1/models/{pipeline}/schedule").json()["model_id"]
        == (uploaded["safetensors"]["id"])
    )
    x = np.zeros((1, 1, 8, 8)).tolist()  # the σ check still reads the stored schedule
    too_large = client.post("/v1/certify", json={"model_id": pipeline, "inputs": x, "sigma": 2})
    assert too_large.status_code == 422, too_large.text
    assert "beyond this diffusion model's schedule" in too_large.json()["detail"]
    for model_id in (demo_model["id"], "0123456789abcdef"):
        assert client.get(f"/v1/models/{model_id}/schedule").status_code == 404
    assert admin.delete(f"/v1/models/{pipeline}").status_code == 204
