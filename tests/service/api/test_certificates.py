"""Certificates on the real stack: issued when a job succeeds, signed by the API with a key whose
public half GET /v1/signing-keys lists, binding the model's and the inputs' digests, kept after the
job's record is gone, another account's a 404, and still verifiable after a key rotation."""

from __future__ import annotations

import hashlib
import io
import json

import httpx
import numpy as np
import pytest
import redis

from smoothcert.service.cli.main import main
from smoothcert.service.core.certificates import (
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    arrays_digest,
    input_digest,
    open_envelope,
)
from smoothcert.service.core.images import to_unit
from smoothcert.service.core.signing import SigningKeys, load_public_pem
from tests.support.stack import ADMIN_KEY, account_key, upload_dataset, wait_for, wait_job

pytestmark = pytest.mark.process

JOB = {"sigma": 0.25, "n0": 20, "n": 200, "alpha": 0.01}


def verify(client: httpx.Client, data: bytes, tmp_path, *checks: str) -> int:
    """`smoothcert verify` of the certificate ``data`` with the keys the API lists, offline."""
    (tmp_path / "cert.json").write_bytes(data)
    (tmp_path / "keys.json").write_text(client.get("/v1/signing-keys").text)
    return main(
        ["verify", str(tmp_path / "cert.json"), "--keys", str(tmp_path / "keys.json"), *checks]
    )


def keys_of(client: httpx.Client) -> dict:
    listed = client.get("/v1/signing-keys").json()["keys"]
    return {k["keyid"]: load_public_pem(k["public_key_pem"]) for k in listed}


def opened(client: httpx.Client, data: bytes) -> tuple[dict, str]:
    return open_envelope(json.loads(data), keys_of(client))


@pytest.fixture(scope="module")
def digits(demo_paths):
    return np.load(demo_paths["test_x"])[:3], np.load(demo_paths["test_y"])[:3]


@pytest.fixture(scope="module")
def certified(client, demo_model, digits, data_dir):
    x, y = digits
    body = {"model_id": demo_model["id"], "inputs": x.tolist(), "labels": y.tolist(), **JOB}
    resp = client.post("/v1/certify", json={**body, "seed": 77})
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"], timeout=120)
    assert job["status"] == "succeeded", job
    return job


def test_a_certificate_is_issued_when_the_job_succeeds(certified, data_dir):
    # No request for it: the API's issuer signs it in the background.
    by_job = data_dir / "certificates" / "by-job" / certified["id"]
    wait_for(by_job.exists, 30, "the certificate to be issued")
    sha = by_job.read_text().strip()
    assert (
        hashlib.sha256((data_dir / "certificates" / f"{sha}.json").read_bytes()).hexdigest() == sha
    )


def test_the_certificate_binds_the_model_inputs_rows_and_seed(
    client, certified, demo_model, digits, anonymous, demo_paths, tmp_path
):
    resp = client.get(f"/v1/jobs/{certified['id']}/certificate")
    assert resp.status_code == 200, resp.text
    sha = resp.headers["X-Certificate-SHA256"]
    assert hashlib.sha256(resp.content).hexdigest() == sha
    assert resp.headers["Location"] == f"/v1/certificates/{sha}"
    envelope = resp.json()
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    statement, keyid = opened(anonymous, resp.content)  # the key list needs no API key
    assert statement["_type"] == STATEMENT_TYPE and statement["predicateType"] == PREDICATE_TYPE
    x, y = digits
    subject = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subject[f"model:{demo_model['id']}"] == demo_model["sha256"]
    assert [subject[f"input:{i}"] for i in range(3)] == [input_digest(row) for row in x]
    predicate = statement["predicate"]
    assert predicate["seed"] == {"value": 77, "source": "client"}
    assert predicate["requested_by"] == {"account": "default"}
    assert predicate["parameters"]["sigma"] == JOB["sigma"] and predicate["parameters"]["n"] == 200
    rows = certified["result"]["results"]
    assert [r["radius"] for r in predicate["rows"]] == [r["radius"] for r in rows]
    assert [r["label"] for r in predicate["rows"]] == y.tolist()
    assert all("elapsed_s" not in r for r in predicate["rows"])
    right = [r["prediction"] == r["label"] for r in rows]
    acr = np.mean([r["radius"] if ok else 0.0 for ok, r in zip(right, rows)])
    assert predicate["summary"]["acr"] == pytest.approx(acr, abs=1e-12)
    assert "with probability at least 1 - 0.01" in predicate["guarantee"]
    assert predicate["provenance"]["model_sha256"] == demo_model["sha256"]
    # The same bytes again, and by digest.
    assert client.get(f"/v1/jobs/{certified['id']}/certificate").content == resp.content
    assert client.get(f"/v1/certificates/{sha}").content == resp.content
    assert keyid in keys_of(anonymous)
    np.save(tmp_path / "x.npy", x)
    checks = ("--model", str(demo_paths["safetensors"]), "--inputs", str(tmp_path / "x.npy"))
    assert verify(anonymous, resp.content, tmp_path, *checks) == 0
    np.save(tmp_path / "x.npy", x[::-1])  # the inputs in another order are not these inputs
    assert verify(anonymous, resp.content, tmp_path, *checks) == 1


def test_the_report_page(client, certified, anonymous):
    resp = client.get(f"/v1/jobs/{certified['id']}/report.html")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert "script-src" not in resp.headers["content-security-policy"]
    assert "default-src 'none'" in resp.headers["content-security-policy"]
    sha = client.get(f"/v1/jobs/{certified['id']}/certificate").headers["X-Certificate-SHA256"]
    assert sha in resp.text and "smoothcert verify" in resp.text
    assert anonymous.get(f"/v1/jobs/{certified['id']}/report.html").status_code == 401


def test_a_drawn_seed_is_said_to_be_the_services(client, demo_model, digits):
    x, _ = digits
    resp = client.post(
        "/v1/certify", json={"model_id": demo_model["id"], "inputs": x[:1].tolist(), **JOB}
    )
    job = wait_job(client, resp.json()["job_id"], timeout=120)
    cert = client.get(f"/v1/jobs/{job['id']}/certificate")
    statement, _ = opened(client, cert.content)
    assert statement["predicate"]["seed"] == {"value": job["params"]["seed"], "source": "service"}


def test_the_certificate_outlives_the_record_and_is_no_one_elses(
    client, api_url, certified, redis_url, tmp_path
):
    sha = client.get(f"/v1/jobs/{certified['id']}/certificate").headers["X-Certificate-SHA256"]
    other = account_key(api_url, ADMIN_KEY, "cert-other")
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {other}"}) as them:
        assert them.get(f"/v1/certificates/{sha}").status_code == 404
        assert them.get(f"/v1/jobs/{certified['id']}/certificate").status_code == 404
    assert client.get(f"/v1/certificates/{'0' * 64}").status_code == 404
    assert client.get("/v1/certificates/not-a-digest").status_code == 404
    r = redis.Redis.from_url(redis_url)
    r.delete(f"smoothcert:job:{certified['id']}")  # as if its TTL had passed
    assert client.get(f"/v1/jobs/{certified['id']}").status_code == 404
    kept = client.get(f"/v1/certificates/{sha}")
    assert kept.status_code == 200 and hashlib.sha256(kept.content).hexdigest() == sha
    opened(client, kept.content)
    assert verify(client, kept.content, tmp_path) == 0  # still verifies


def test_a_job_that_did_not_succeed_has_no_certificate(client, demo_model, digits):
    x, _ = digits
    long = {**JOB, "n": 2_000_000, "batch_size": 500}
    resp = client.post(
        "/v1/certify", json={"model_id": demo_model["id"], "inputs": x[:1].tolist(), **long}
    )
    job_id = resp.json()["job_id"]
    refused = client.get(f"/v1/jobs/{job_id}/certificate")
    assert refused.status_code == 409 and "succeeded" in refused.json()["detail"]
    client.delete(f"/v1/jobs/{job_id}")


def test_a_dataset_job_names_the_dataset_and_every_row(client, demo_model, demo_paths, tmp_path):
    x = np.rint(np.load(demo_paths["test_x"])[:7] * 255).astype(np.uint8)
    y = np.load(demo_paths["test_y"])[:7].astype(np.int64)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    dataset = upload_dataset(client, buf.getvalue()).json()
    assert dataset["arrays_sha256"] == arrays_digest({"x": x, "y": y})
    body = {"model_id": demo_model["id"], "dataset_id": dataset["id"], "skip": 2, **JOB}
    job = wait_job(client, client.post("/v1/certify", json=body).json()["job_id"], timeout=120)
    assert job["status"] == "succeeded", job
    statement, _ = opened(client, client.get(f"/v1/jobs/{job['id']}/certificate").content)
    subject = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subject[f"dataset:{dataset['id']}"] == dataset["arrays_sha256"]
    assert [subject[f"input:{i}"] for i in range(2, 7)] == [input_digest(to_unit(r)) for r in x[2:]]
    chunks = statement["predicate"]["chunks"]
    assert sum(c["count"] for c in chunks) == 5 and chunks[0]["first"] == 2
    (tmp_path / "data.npz").write_bytes(buf.getvalue())
    cert = client.get(f"/v1/jobs/{job['id']}/certificate").content
    assert verify(client, cert, tmp_path, "--dataset", str(tmp_path / "data.npz")) == 0


def test_certificates_verify_after_a_key_rotation(
    client, certified, demo_model, digits, data_dir, tmp_path
):
    before = client.get(f"/v1/jobs/{certified['id']}/certificate")
    if before.status_code == 404:  # the record was deleted above: read it by digest
        by_job = data_dir / "certificates" / "by-job" / certified["id"]
        before = client.get(f"/v1/certificates/{by_job.read_text().strip()}")
    _, old_key = opened(client, before.content)
    old, new = SigningKeys(
        data_dir / "signing"
    ).rotate()  # what `smoothcert signing-key rotate` does
    assert old == old_key and new != old
    listed = {k["keyid"]: k for k in client.get("/v1/signing-keys").json()["keys"]}
    assert listed[new]["active"] and not listed[old]["active"] and listed[old]["retired_time"]
    x, _ = digits
    body = {"model_id": demo_model["id"], "inputs": x[:1].tolist(), **JOB}
    job = wait_job(client, client.post("/v1/certify", json=body).json()["job_id"], timeout=120)
    _, keyid = opened(client, client.get(f"/v1/jobs/{job['id']}/certificate").content)
    assert keyid == new
    assert opened(client, before.content)[1] == old  # the old certificate still verifies
    assert verify(client, before.content, tmp_path) == 0


def test_a_certificate_counts_against_its_accounts_storage_until_deleted(
    api_url, demo_model, digits, redis_url
):
    account = "cert-storage"
    key = account_key(api_url, ADMIN_KEY, account)
    other = account_key(api_url, ADMIN_KEY, "cert-storage-other")
    x, y = digits
    body = {"model_id": demo_model["id"], "inputs": x.tolist(), "labels": y.tolist(), **JOB}
    r = redis.Redis.from_url(redis_url)
    amounts = f"smoothcert:storage:{account}:amounts"
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}) as mine:
        resp = mine.post("/v1/certify", json={**body, "seed": 5})
        assert resp.status_code == 202, resp.text
        job = wait_job(mine, resp.json()["job_id"], timeout=120)
        assert job["status"] == "succeeded", job
        got = mine.get(f"/v1/jobs/{job['id']}/certificate")
        sha = got.headers["X-Certificate-SHA256"]
        # Held against the account: at least the file's size, in whole blocks.
        held = int(r.hget(amounts, f"certificate:{sha}"))
        assert held >= len(got.content) and held % 512 == 0
        with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {other}"}) as them:
            assert them.delete(f"/v1/certificates/{sha}").status_code == 404
        assert mine.get(f"/v1/certificates/{sha}").status_code == 200

        assert mine.delete(f"/v1/certificates/{sha}").status_code == 204
        assert r.hget(amounts, f"certificate:{sha}") is None
        assert mine.get(f"/v1/certificates/{sha}").status_code == 404
        assert mine.delete(f"/v1/certificates/{sha}").status_code == 404
        # The job's record lives on: asking for its certificate issues a new one, held again.
        again = mine.get(f"/v1/jobs/{job['id']}/certificate")
        assert again.status_code == 200
        new_sha = again.headers["X-Certificate-SHA256"]
        assert r.hget(amounts, f"certificate:{new_sha}") is not None
