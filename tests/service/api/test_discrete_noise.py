"""Discrete noise through the API: inputs on the 8-bit grid, quantize, the refusals, and the same
answer as the engine's for the same seed."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from smoothcert.service.cli.main import main
from smoothcert.service.core.certificates import input_digest, open_envelope
from smoothcert.service.core.signing import load_public_pem
from tests.support.stack import upload_dataset, wait_job

pytestmark = pytest.mark.process

JOB = {"sigma": 0.25, "n0": 20, "n": 300, "seed": 26, "noise": "discrete"}


@pytest.fixture(scope="module")
def levels(demo_paths):
    """The first demo test digits rounded onto the 8-bit grid (uint8 levels) and their labels."""
    x = np.load(demo_paths["test_x"])[:3]
    return np.rint(x * 255).astype(np.uint8), np.load(demo_paths["test_y"])[:3]


def certificate(client, job_id: str) -> dict:
    """The in-toto statement of a job's certificate, its signature checked with the API's keys."""
    listed = client.get("/v1/signing-keys").json()["keys"]
    keys = {k["keyid"]: load_public_pem(k["public_key_pem"]) for k in listed}
    envelope = client.get(f"/v1/jobs/{job_id}/certificate")
    assert envelope.status_code == 200
    return open_envelope(json.loads(envelope.content), keys)[0]


def post(client, **body):
    return client.post("/v1/certify", json=body)


def test_grid_inputs_give_the_engines_answer_and_record_the_noise(
    client, demo_model, demo_paths, levels, tmp_path, capsys
):
    from smoothcert.models.loaders import load_model
    from smoothcert.worker.smoothing import RunOptions, certify
    from smoothcert.worker.smoothing.discrete import thresholds

    k, y = levels
    x = (k / np.float32(255)).astype(np.float32)
    body = {**JOB, "model_id": demo_model["id"], "inputs": x.tolist(), "labels": y.tolist()}
    resp = post(client, **body, batch_size=64, runtime="torch")
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"], timeout=120)
    assert job["status"] == "succeeded", job["error"]
    assert job["params"]["noise"] == "discrete" and "quantize" not in job["params"]
    direct = certify(
        load_model(demo_paths["safetensors"], device="cpu"),
        x,
        0.25,
        20,
        300,
        options=RunOptions(seed=26, batch_size=64),
        noise="discrete",
    )
    rows = job["result"]["results"]
    assert [r["votes"] for r in rows] == [c.votes for c in direct.results]
    assert [r["radius"] for r in rows] == [c.radius for c in direct.results]
    provenance = job["result"]["provenance"]
    table = thresholds(0.25)
    assert provenance["noise"] == "discrete" and provenance["noise_k"] == 1
    assert provenance["thresholds_sha256"] == table.sha256
    assert provenance["alpha_effective"] == 0.001 + table.total_variation * 64 * 300
    # and `smoothcert verify --recompute` checks the noise and reruns the job with it
    (tmp_path / "cert.json").write_bytes(client.get(f"/v1/jobs/{job['id']}/certificate").content)
    (tmp_path / "keys.json").write_text(client.get("/v1/signing-keys").text)
    np.save(tmp_path / "x.npy", x)
    code = main(
        ["verify", str(tmp_path / "cert.json"), "--keys", str(tmp_path / "keys.json")]
        + ["--model", str(demo_paths["safetensors"]), "--inputs", str(tmp_path / "x.npy")]
        + ["--recompute"]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "noise: ok (discrete noise: K = 1" in err
    assert "recompute (same seed): ok (3 of 3 rows identical" in err


def test_float_inputs_off_the_grid_are_refused_unless_quantized(client, demo_model, demo_paths):
    x = np.load(demo_paths["test_x"])[:2]  # digits / 16: off the grid
    refused = post(client, **JOB, model_id=demo_model["id"], inputs=x.tolist())
    assert refused.status_code == 422
    assert "8-bit grid" in refused.json()["detail"] and "quantize" in refused.json()["detail"]
    resp = post(client, **JOB, model_id=demo_model["id"], inputs=x.tolist(), quantize=True)
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"], timeout=120)
    assert job["status"] == "succeeded", job["error"]
    assert job["params"]["quantize"] is True
    assert job["result"]["provenance"]["quantize"] is True
    # the certificate is about the rounded image: its subjects digest the rounded inputs
    statement = certificate(client, job["id"])
    subject = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    rounded = (np.rint(x * 255) / np.float32(255)).astype(np.float32)
    assert [subject[f"input:{i}"] for i in range(2)] == [input_digest(r) for r in rounded]
    assert subject["input:0"] != input_digest(x[0])
    predicate = statement["predicate"]
    assert predicate["parameters"]["quantize"] is True
    noise = predicate["noise"]
    assert noise["kind"] == "discrete" and noise["quantize"] is True and noise["input_size"] == 64
    assert noise["alpha_effective"] == job["result"]["provenance"]["alpha_effective"]
    assert "rounded onto the 8-bit grid" in predicate["guarantee"]


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        ({"noise": "gaussian", "quantize": True}, "quantize rounds inputs"),
        ({"sigma": 5.0}, "discrete noise takes sigma at most 4"),
        ({"noise": "uniform"}, "noise"),
    ],
)
def test_bad_noise_parameters_are_refused(client, demo_model, levels, extra, phrase):
    k, _ = levels
    body = {**JOB, "model_id": demo_model["id"], "inputs": (k / 255).tolist(), **extra}
    resp = post(client, **body)
    assert resp.status_code == 422 and phrase in resp.text


def test_png_uploads_and_uint8_datasets_are_on_the_grid(client, demo_model, levels):
    k, y = levels
    files = []
    for i, image in enumerate(k):
        buf = io.BytesIO()
        Image.fromarray(image[0], mode="L").save(buf, format="PNG")
        files.append(("inputs", (f"d{i}.png", buf.getvalue(), "image/png")))
    form = {"model_id": demo_model["id"], **{key: str(v) for key, v in JOB.items()}}
    resp = client.post("/v1/certify", data=form, files=files)
    assert resp.status_code == 202, resp.text
    image_job = wait_job(client, resp.json()["job_id"], timeout=120)
    assert image_job["status"] == "succeeded", image_job["error"]
    buf = io.BytesIO()
    np.savez(buf, x=k, y=y.astype(np.int64))
    dataset = upload_dataset(client, buf.getvalue()).json()
    resp = post(client, **JOB, model_id=demo_model["id"], dataset_id=dataset["id"])
    assert resp.status_code == 202, resp.text
    dataset_job = wait_job(client, resp.json()["job_id"], timeout=120)
    assert dataset_job["status"] == "succeeded", dataset_job["error"]
    # same pixels, same seed: the dataset's chunk draws with its own seed, the image job with the
    # job's, so compare what does not depend on the draw
    assert [r["n"] for r in dataset_job["result"]["results"]] == [300] * 3
    assert [r["n"] for r in image_job["result"]["results"]] == [300] * 3
    assert dataset_job["result"]["provenance"]["noise"] == "discrete"


def test_a_float_dataset_off_the_grid_fails_its_job_with_the_rule_unless_quantized(
    client, demo_model, demo_paths
):
    buf = io.BytesIO()
    x = np.load(demo_paths["test_x"])[:2]  # k/16: off the grid, which the worker finds
    np.savez(buf, x=x, y=np.load(demo_paths["test_y"])[:2].astype(np.int64))
    dataset = upload_dataset(client, buf.getvalue()).json()
    body = {**JOB, "model_id": demo_model["id"], "dataset_id": dataset["id"]}
    failed = wait_job(client, post(client, **body).json()["job_id"], timeout=120)
    assert failed["status"] == "failed" and "8-bit grid" in failed["error"]
    rounded = wait_job(client, post(client, **body, quantize=True).json()["job_id"], timeout=120)
    assert rounded["status"] == "succeeded", rounded["error"]
    assert rounded["result"]["provenance"]["quantize"] is True
