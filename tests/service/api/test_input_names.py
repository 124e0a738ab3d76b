"""Inputs keep their names: a multipart body's image file names, or a JSON body's ``names``, reach
each row, the TSV (a last ``name`` column) and the certificate."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from smoothcert.service.core.certificates import open_envelope
from smoothcert.service.core.signing import load_public_pem
from tests.support.stack import wait_job

pytestmark = pytest.mark.process

TINY = {"sigma": 0.25, "n0": 10, "n": 100, "seed": 1}


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_file_names_reach_the_rows_the_tsv_and_the_certificate(client, demo_model, demo_paths):
    x = np.rint(np.load(demo_paths["test_x"])[:2, 0] * 255).astype(np.uint8)
    files = [("inputs", ("seven.png", png(x[0]))), ("inputs", ("two.png", png(x[1])))]
    form = {"model_id": demo_model["id"], **{k: str(v) for k, v in TINY.items()}}
    resp = client.post("/v1/certify", data=form, files=files)
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"], timeout=120)
    assert [r["name"] for r in job["result"]["results"]] == ["seven.png", "two.png"]
    header, *lines = client.get(f"/v1/jobs/{job['id']}/results.tsv").text.splitlines()
    assert header.split("\t")[-1] == "name" and header.split("\t")[0] == "idx"
    assert [line.split("\t")[-1] for line in lines] == ["seven.png", "two.png"]
    cert = client.get(f"/v1/jobs/{job['id']}/certificate")
    keys = {
        k["keyid"]: load_public_pem(k["public_key_pem"])
        for k in client.get("/v1/signing-keys").json()["keys"]
    }
    statement, _ = open_envelope(json.loads(cert.content), keys)
    assert [r["name"] for r in statement["predicate"]["rows"]] == ["seven.png", "two.png"]


def test_json_names_are_one_per_input(client, demo_model, demo_paths):
    x = np.load(demo_paths["test_x"])[:2]
    body = {"model_id": demo_model["id"], "inputs": x.tolist(), **TINY}
    resp = client.post("/v1/certify", json={**body, "names": ["a", "b"]})
    job = wait_job(client, resp.json()["job_id"], timeout=120)
    assert [r["name"] for r in job["result"]["results"]] == ["a", "b"]
    refused = client.post("/v1/certify", json={**body, "names": ["only one"]})
    assert refused.status_code == 422 and "names has 1 entries for 2 inputs" in refused.text
    control = client.post("/v1/certify", json={**body, "names": ["a\tb", "c"]})
    assert control.status_code == 422
    plain = wait_job(client, client.post("/v1/certify", json=body).json()["job_id"], timeout=120)
    assert all("name" not in r for r in plain["result"]["results"])
    assert "name" not in client.get(f"/v1/jobs/{plain['id']}/results.tsv").text.split("\n")[0]
