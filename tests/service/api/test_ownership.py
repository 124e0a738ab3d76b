"""Ownership on the real stack with two accounts: every route that names a job, dataset or model
refuses another account's with the 404 of an unknown id and lists none of them; a public model is
usable by both and changeable by neither; the admin sees everything; each refusal is audited."""

from __future__ import annotations

import io
import json
import time
import uuid

import httpx
import numpy as np
import pytest

from tests.support.stack import ADMIN_KEY, account_key, upload_dataset, wait_job

pytestmark = pytest.mark.process

SCOPES = ("certify", "models", "train")
JOB = {"sigma": 0.25, "n0": 10, "n": 100, "seed": 3}


def npz(x: np.ndarray, y: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    return buf.getvalue()


def detail(resp: httpx.Response) -> str:
    return resp.json()["detail"]


@pytest.fixture(scope="module")
def two(api_url, demo_paths, demo_model):
    """Clients of accounts ``own-alice`` and ``own-bob``; alice's private model, dataset and
    succeeded certify job (with labels)."""
    keys = {name: account_key(api_url, ADMIN_KEY, f"own-{name}", *SCOPES) for name in ("a", "b")}
    clients = {
        name: httpx.Client(
            base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        )
        for name, key in keys.items()
    }
    alice = clients["a"]
    with open(demo_paths["safetensors"], "rb") as f:
        model = alice.post(
            "/v1/models", files={"file": ("alices.safetensors", f)}, data={"name": "alice's"}
        )
    assert model.status_code == 201, model.text
    x, y = np.load(demo_paths["test_x"])[:4], np.load(demo_paths["test_y"])[:4]
    dataset = upload_dataset(alice, npz((x * 255).round().astype(np.uint8), y), "alices.npz")
    assert dataset.status_code == 201, dataset.text
    job = alice.post(
        "/v1/certify",
        json={"model_id": model.json()["id"], "dataset_id": dataset.json()["id"], **JOB},
    )
    assert job.status_code == 202, job.text
    done = wait_job(alice, job.json()["job_id"], timeout=120)
    assert done["status"] == "succeeded", done
    yield {
        "alice": alice,
        "bob": clients["b"],
        "model": model.json(),
        "dataset": dataset.json(),
        "job": done,
    }
    for client in clients.values():
        client.close()


def test_records_name_their_account_and_models_are_private_by_default(two):
    assert (two["model"]["owner"], two["model"]["visibility"]) == ("own-a", "private")
    assert two["dataset"]["owner"] == "own-a"
    assert two["job"]["owner"] == "own-a"


def test_another_accounts_job_is_unknown_on_every_route(two):
    bob, job_id = two["bob"], two["job"]["id"]
    stranger = str(uuid.uuid4())
    for method, path in (
        ("GET", "/v1/jobs/{}"),
        ("GET", "/v1/jobs/{}/results.tsv"),
        ("GET", "/v1/jobs/{}/samples.png"),
        ("GET", "/v1/jobs/{}/curve.svg"),
        ("DELETE", "/v1/jobs/{}"),
    ):
        theirs = bob.request(method, path.format(job_id))
        unknown = bob.request(method, path.format(stranger))
        assert theirs.status_code == unknown.status_code == 404, (path, theirs.text)
        assert detail(theirs) == detail(unknown).replace(stranger, job_id), path
    for path in ("", "/results.tsv", "/samples.png", "/curve.svg"):  # alice still has it all
        assert two["alice"].get(f"/v1/jobs/{job_id}{path}").status_code == 200, path
    assert two["alice"].get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    listed = bob.get("/v1/jobs", params={"limit": 100}).json()["jobs"]
    assert job_id not in {j["id"] for j in listed}
    assert job_id in {j["id"] for j in two["alice"].get("/v1/jobs").json()["jobs"]}


def test_another_accounts_dataset_is_unknown_on_every_route(two, demo_model):
    bob, alice = two["bob"], two["alice"]
    dataset_id, stranger = two["dataset"]["id"], "d" + uuid.uuid4().hex[:12]
    for method, path in (("GET", "/v1/datasets/{}"), ("DELETE", "/v1/datasets/{}")):
        theirs, unknown = (bob.request(method, path.format(d)) for d in (dataset_id, stranger))
        assert theirs.status_code == unknown.status_code == 404, (path, theirs.text)
        assert detail(theirs) == detail(unknown).replace(stranger, dataset_id)
    certify = {"model_id": demo_model["id"], "dataset_id": dataset_id, **JOB}
    refused = bob.post("/v1/certify", json=certify)
    assert refused.status_code == 404 and detail(refused) == f"unknown dataset {dataset_id!r}"
    train = bob.post("/v1/train", json={"dataset": dataset_id, "epochs": 1})
    assert train.status_code == 404, train.text
    assert dataset_id in detail(train)
    assert dataset_id not in {d["id"] for d in bob.get("/v1/datasets").json()["datasets"]}
    assert dataset_id in {d["id"] for d in alice.get("/v1/datasets").json()["datasets"]}
    assert alice.get(f"/v1/datasets/{dataset_id}").status_code == 200


def test_another_accounts_private_model_is_unknown_on_every_route(two, demo_model):
    bob, model_id = two["bob"], two["model"]["id"]
    stranger = "m" + uuid.uuid4().hex[:12]
    for method, path, body in (
        ("GET", "/v1/models/{}", None),
        ("GET", "/v1/models/{}/schedule", None),
        ("DELETE", "/v1/models/{}", None),
        ("PATCH", "/v1/models/{}", {"visibility": "public"}),
    ):
        theirs, unknown = (
            bob.request(method, path.format(m), json=body) for m in (model_id, stranger)
        )
        assert theirs.status_code == unknown.status_code == 404, (path, theirs.text)
        assert detail(theirs) == detail(unknown).replace(stranger, model_id), path
    x = [[[[0.5] * 8] * 8]]
    refused = bob.post("/v1/certify", json={"model_id": model_id, "inputs": x, **JOB})
    assert refused.status_code == 404 and detail(refused) == f"unknown model {model_id!r}"
    pipeline = bob.post(
        "/v1/models/pipelines", json={"denoiser": model_id, "classifier": demo_model["id"]}
    )
    assert pipeline.status_code == 404 and model_id in detail(pipeline)
    denoiser = bob.post(
        "/v1/train/denoiser",
        json={"dataset": "digits", "classifier": model_id, "objective": "stability", "epochs": 1},
    )
    assert denoiser.status_code == 404 and model_id in detail(denoiser), denoiser.text
    assert model_id not in {m["id"] for m in bob.get("/v1/models").json()}
    assert model_id in {m["id"] for m in two["alice"].get("/v1/models").json()}


def test_a_public_model_is_usable_by_both_and_changeable_by_neither(two, demo_model, admin):
    public = demo_model["id"]  # the admin's, public
    assert (demo_model["owner"], demo_model["visibility"]) == ("admin", "public")
    for client in (two["alice"], two["bob"]):
        assert public in {m["id"] for m in client.get("/v1/models").json()}
        accepted = client.post(
            "/v1/certify", json={"model_id": public, "inputs": [[[[0.5] * 8] * 8]], **JOB}
        )
        assert accepted.status_code == 202, accepted.text
        assert wait_job(client, accepted.json()["job_id"])["status"] == "succeeded"
        deleted = client.delete(f"/v1/models/{public}")
        assert deleted.status_code == 403 and "account 'admin'" in detail(deleted)
        patched = client.patch(f"/v1/models/{public}", json={"visibility": "private"})
        assert patched.status_code == 403
    assert admin.get(f"/v1/models/{public}").json()["visibility"] == "public"


def test_the_owner_publishes_and_withdraws_a_model(two):
    alice, bob, model_id = two["alice"], two["bob"], two["model"]["id"]
    try:
        made = alice.patch(f"/v1/models/{model_id}", json={"visibility": "public"})
        assert made.status_code == 200 and made.json()["visibility"] == "public"
        assert bob.get(f"/v1/models/{model_id}").json()["owner"] == "own-a"
        assert bob.delete(f"/v1/models/{model_id}").status_code == 403
    finally:
        back = alice.patch(f"/v1/models/{model_id}", json={"visibility": "private"})
        assert back.status_code == 200 and back.json()["visibility"] == "private"
    assert bob.get(f"/v1/models/{model_id}").status_code == 404
    bad = alice.patch(f"/v1/models/{model_id}", json={"visibility": "everyone"})
    assert bad.status_code == 422


def test_the_admin_sees_and_acts_on_everything(two, admin):
    job_id, dataset_id, model_id = two["job"]["id"], two["dataset"]["id"], two["model"]["id"]
    assert admin.get(f"/v1/jobs/{job_id}").json()["owner"] == "own-a"
    assert admin.get(f"/v1/jobs/{job_id}/results.tsv").status_code == 200
    assert admin.get(f"/v1/datasets/{dataset_id}").json()["owner"] == "own-a"
    assert admin.get(f"/v1/models/{model_id}").json()["owner"] == "own-a"
    listed = admin.get("/v1/datasets", params={"limit": 100}).json()["datasets"]
    assert dataset_id in {d["id"] for d in listed}
    assert model_id in {m["id"] for m in admin.get("/v1/models").json()}


def test_refusals_of_another_accounts_resources_are_audited(two, data_dir):
    bob, job_id = two["bob"], two["job"]["id"]
    assert bob.get(f"/v1/jobs/{job_id}").status_code == 404
    deadline = time.monotonic() + 5
    while True:
        lines = [
            json.loads(line)["audit"]
            for line in (data_dir / "api.log").read_text(errors="replace").splitlines()
            if '"smoothcert.audit"' in line
        ]
        mine = [a for a in lines if a.get("status") == 404 and job_id in a.get("reason", "")]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert mine and mine[-1]["account"] == "own-b" and mine[-1]["key_id"]
    assert mine[-1]["reason"] == f"job {job_id} belongs to another account"


def test_deleting_ones_own_dataset_and_model_works(two, demo_paths):
    alice, bob = two["alice"], two["bob"]
    x, y = np.zeros((2, 1, 8, 8), np.uint8), np.zeros(2, np.int64)
    mine = upload_dataset(bob, npz(x, y), "bobs.npz")
    assert mine.status_code == 201
    assert alice.delete(f"/v1/datasets/{mine.json()['id']}").status_code == 404
    assert bob.delete(f"/v1/datasets/{mine.json()['id']}").status_code == 204
    with open(demo_paths["safetensors"], "rb") as f:
        model = bob.post("/v1/models", files={"file": ("bobs.safetensors", f)})
    assert model.status_code == 201, model.text
    assert alice.delete(f"/v1/models/{model.json()['id']}").status_code == 404
    assert bob.delete(f"/v1/models/{model.json()['id']}").status_code == 204
