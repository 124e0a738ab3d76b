"""Pipeline models over HTTP on the real stack: a denoiser followed by a classifier registered as
one model (``POST /v1/models/pipelines``), its refusals, and certify, predict and dataset jobs on
it whose rows are the CLI's `certify --denoiser` rows for the same seed."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from smoothcert.models.metadata import pipeline_sha256
from smoothcert.service.cli.main import main
from tests.support.cli_rows import assert_same_certificates, cli_certify
from tests.support.denoisers import random_denoiser
from tests.support.stack import ADMIN_KEY, upload_dataset, upload_model_file, wait_job

JOB = {"sigma": 0.5, "n0": 20, "n": 200, "alpha": 0.001, "batch_size": 100, "seed": 5}


@pytest.fixture(scope="module")
def denoiser_file(tmp_path_factory):
    return random_denoiser(tmp_path_factory.mktemp("den") / "den.safetensors", scale=0.3)


@pytest.fixture(scope="module")
def denoiser(admin, denoiser_file) -> dict:
    resp = upload_model_file(admin, denoiser_file)
    assert resp.status_code == 201, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def pipeline(admin, denoiser, demo_model) -> dict:
    resp = admin.post(
        "/v1/models/pipelines",
        json={
            "denoiser": denoiser["id"],
            "classifier": demo_model["id"],
            "name": "denoised digits",
            "visibility": "public",  # the user key's account certifies with it
        },
    )
    assert resp.status_code == 201, resp.text
    assert resp.headers["Location"] == f"/v1/models/{resp.json()['id']}"
    return resp.json()


@pytest.fixture(scope="module")
def digits(demo_paths):
    return np.load(demo_paths["test_x"])[:6], np.load(demo_paths["test_y"])[:6]


def test_an_uploaded_denoiser_is_recorded_as_one(denoiser):
    assert (
        denoiser["kind"] == "denoiser"
        and denoiser["arch"] == "dncnn"
        and denoiser["num_classes"] is None
    )
    assert denoiser["input_shape"] == [1, 8, 8]


def test_a_pipeline_is_registered_with_both_parts_and_its_own_sha256(
    client, pipeline, denoiser, demo_model
):
    assert (
        pipeline["kind"] == "pipeline"
        and pipeline["format"] == "pipeline"
        and pipeline["name"] == "denoised digits"
    )
    assert pipeline["denoiser"] == denoiser["id"] and pipeline["classifier"] == demo_model["id"]
    assert pipeline["sha256"] == pipeline_sha256(denoiser["sha256"], demo_model["sha256"])
    assert pipeline["input_shape"] == [1, 8, 8] and pipeline["num_classes"] == 10
    assert {role: part["sha256"] for role, part in pipeline["parts"].items()} == {
        "denoiser": denoiser["sha256"],
        "classifier": demo_model["sha256"],
    }
    assert pipeline["id"] in [m["id"] for m in client.get("/v1/models").json()]


@pytest.mark.parametrize(
    "body,status,phrase",
    [
        (
            {"denoiser": "nosuchmodel", "classifier": "CLASSIFIER"},
            404,
            "unknown denoiser model 'nosuchmodel'",
        ),
        (
            {"denoiser": "DENOISER", "classifier": "nosuchmodel"},
            404,
            "unknown classifier model 'nosuchmodel'",
        ),
        ({"denoiser": "CLASSIFIER", "classifier": "CLASSIFIER"}, 422, "is not a denoiser"),
        (
            {"denoiser": "DENOISER", "classifier": "DENOISER"},
            422,
            "is a denoiser; the classifier must output class",
        ),
        ({"denoiser": "DENOISER", "classifier": "PIPELINE"}, 422, "is itself a pipeline"),
        ({"denoiser": "PIPELINE", "classifier": "CLASSIFIER"}, 422, "is itself a pipeline"),
        ({"denoiser": "SMALL", "classifier": "CLASSIFIER"}, 422, "shape [1, 6, 6], the classifier"),
        ({"denoiser": "DENOISER"}, 422, "classifier"),
    ],
)
def test_parts_that_cannot_form_a_pipeline_are_refused(
    admin, client, data_dir, tmp_path, denoiser, demo_model, pipeline, body, status, phrase
):
    ids = {"DENOISER": denoiser["id"], "CLASSIFIER": demo_model["id"], "PIPELINE": pipeline["id"]}
    if "SMALL" in body.values():
        resp = upload_model_file(
            admin, random_denoiser(tmp_path / "small.safetensors", input_shape=(1, 6, 6))
        )
        assert resp.status_code == 201, resp.text
        ids["SMALL"] = resp.json()["id"]
    before = sorted(p.name for p in (data_dir / "models").iterdir())
    resp = admin.post("/v1/models/pipelines", json={k: ids.get(v, v) for k, v in body.items()})
    assert resp.status_code == status, resp.text
    assert phrase in json.dumps(resp.json()["detail"]), resp.json()
    assert sorted(p.name for p in (data_dir / "models").iterdir()) == before  # nothing kept
    assert (
        client.post(
            "/v1/models/pipelines",
            json={"denoiser": denoiser["id"], "classifier": demo_model["id"]},
        ).status_code
        == 403
    )


def test_a_denoiser_alone_cannot_be_certified_and_a_part_in_use_cannot_be_deleted(
    admin, client, denoiser, pipeline, digits
):
    resp = client.post(
        "/v1/certify", json={"model_id": denoiser["id"], "inputs": digits[0].tolist(), **JOB}
    )
    assert resp.status_code == 422 and "is a denoiser" in resp.json()["detail"]
    resp = admin.delete(f"/v1/models/{denoiser['id']}")
    assert resp.status_code == 409 and pipeline["id"] in resp.json()["detail"]
    for pin in ({"runtime": "torch"}, {"runtime": "onnxruntime"}, {"precision": "bfloat16"}):
        resp = client.post(
            "/v1/certify",
            json={"model_id": pipeline["id"], "inputs": digits[0].tolist(), **JOB, **pin},
        )
        assert resp.status_code == 422 and "is a pipeline" in resp.json()["detail"], (
            pin,
            resp.text,
        )


def test_a_pipeline_job_gives_the_rows_of_certify_with_denoiser(
    client, pipeline, denoiser_file, demo_paths, digits, tmp_path
):
    x, y = digits
    resp = client.post(
        "/v1/certify",
        json={"model_id": pipeline["id"], "inputs": x.tolist(), "labels": y.tolist(), **JOB},
    )
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"], timeout=120)
    assert job["status"] == "succeeded", job["error"]
    cli = cli_certify(demo_paths["safetensors"], denoiser_file, x, JOB, tmp_path)
    assert_same_certificates(job["result"]["results"], cli)
    provenance = job["result"]["provenance"]
    assert (
        provenance["model_id"] == pipeline["id"]
        and provenance["model_sha256"] == pipeline["sha256"]
    )
    assert {role: (p["id"], p["sha256"]) for role, p in provenance["model_parts"].items()} == {
        role: (p["id"], p["sha256"]) for role, p in pipeline["parts"].items()
    }
    assert json.loads((tmp_path / "cli.tsv.json").read_text())["model_sha256"] == pipeline["sha256"]


def test_a_dataset_predict_job_runs_on_a_pipeline(client, pipeline, digits):
    buf = io.BytesIO()
    np.savez(buf, x=digits[0], y=digits[1])
    resp = upload_dataset(client, buf.getvalue(), "six.npz")
    assert resp.status_code == 201, resp.text
    resp = client.post(
        "/v1/certify",
        json={
            "model_id": pipeline["id"],
            "dataset_id": resp.json()["id"],
            "mode": "predict",
            "sigma": 0.5,
            "n": 100,
            "seed": 1,
        },
    )
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"], timeout=120)
    assert job["status"] == "succeeded", job["error"]
    assert (
        len(job["result"]["results"]) == 6
        and job["result"]["provenance"]["model_sha256"] == pipeline["sha256"]
    )


def test_the_cli_registers_a_pipeline_and_reports_a_refusal(
    api_url, client, denoiser, demo_model, capsys
):
    connection = ["--url", api_url, "--api-key", ADMIN_KEY]
    assert (
        main(
            [
                "models",
                "pipeline",
                "--denoiser",
                denoiser["id"],
                "--classifier",
                demo_model["id"],
                "--name",
                "from the cli",
                "--visibility",
                "public",
                "--json",
                *connection,
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert record["kind"] == "pipeline" and record["name"] == "from the cli"
    assert (record["owner"], record["visibility"]) == ("admin", "public")
    assert (record["denoiser"], record["classifier"]) == (denoiser["id"], demo_model["id"])
    assert client.get(f"/v1/models/{record['id']}").json()["sha256"] == record["sha256"]
    # The classifier as denoiser: the API's 422 reaches the user as one line and exit status 2.
    assert (
        main(
            [
                "models",
                "pipeline",
                "--denoiser",
                demo_model["id"],
                "--classifier",
                demo_model["id"],
                *connection,
            ]
        )
        == 2
    )
    captured = capsys.readouterr()
    assert captured.out == "" and "is not a denoiser" in captured.err
