"""/healthz and /readyz (what the workers are only for a key holder), and 503 (not 500) when Redis
cannot be reached."""

from __future__ import annotations

import httpx

from smoothcert.service.core.jobs import new_job_id
from tests.support.stack import ADMIN_KEY, USER_KEY, other_db, stack_env, start_api, stop_process


def test_readyz_names_the_live_worker(client):
    body = client.get("/readyz").json()
    assert body["status"] == "ready" and body["redis"] == "ok" and body["workers"]


def test_readyz_describes_each_worker_its_device_and_loaded_models(client, admin, demo_paths):
    # An upload's check runs in the worker's pool process, which keeps the model loaded and says
    # so. A model of its own: the session's demo model may have left the process's list of its
    # last 8 models, or the process may have been replaced by an earlier test.
    with open(demo_paths["safetensors"], "rb") as f:
        resp = admin.post("/v1/models", files={"file": ("readyz.safetensors", f)})
    assert resp.status_code == 201, resp.text
    model = resp.json()
    try:
        (worker,) = [
            w
            for w in client.get("/readyz").json()["worker_details"]
            if w["name"].startswith("test@")
        ]
        assert (
            worker["queues"] == ["certify"]
            and worker["concurrency"] == 1
            and worker["requested_device"] == "cpu"
        )
        (process,) = worker["processes"]
        assert process["device"] == "cpu" and process["pid"] != worker["pid"]
        loaded = {m["id"]: m for m in process["models"]}
        assert (
            loaded[model["id"]]["runtime"] == "torch" and loaded[model["id"]]["provider"] == "cpu"
        )
    finally:
        assert admin.delete(f"/v1/models/{model['id']}").status_code == 204


def test_redis_unreachable_is_503(api_without_redis):
    assert httpx.get(f"{api_without_redis}/healthz").status_code == 200
    ready = httpx.get(f"{api_without_redis}/readyz")
    assert ready.status_code == 503 and "Redis unreachable" in ready.json()["detail"]
    resp = httpx.get(
        f"{api_without_redis}/v1/jobs/{new_job_id()}",
        headers={"Authorization": f"Bearer {USER_KEY}"},
    )
    assert resp.status_code == 503 and "unreachable" in resp.json()["detail"]
    assert resp.headers["retry-after"] == "5"  # about a restart or a Sentinel failover
    assert ready.json() == {
        "status": "not ready",
        "detail": "Redis unreachable",
    }  # no address without a key
    keyed = httpx.get(
        f"{api_without_redis}/readyz", headers={"Authorization": f"Bearer {USER_KEY}"}
    )
    assert keyed.status_code == 503 and keyed.json()["redis"] == "unreachable"


def test_readyz_without_a_valid_key_says_only_whether_it_is_ready(
    api_url, anonymous, client, demo_model
):
    keyed = client.get("/readyz").json()
    names = keyed["workers"]
    pids = [w["pid"] for w in keyed["worker_details"]] + [
        p["pid"] for w in keyed["worker_details"] for p in w["processes"]
    ]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {USER_KEY}"}):
        resp = anonymous.get("/readyz", headers=headers)
        assert resp.status_code == 200 and resp.json() == {"status": "ready"}
        assert not any(name in resp.text for name in names) and demo_model["id"] not in resp.text
        assert not any(f'"{pid}"' in resp.text or f" {pid}" in resp.text for pid in pids)
    admin = httpx.get(f"{api_url}/readyz", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert admin["workers"] == names and admin["worker_details"]


def test_readyz_without_worker_is_503(redis_url, tmp_path_factory):
    # A fresh Redis database of the session's server: reachable, but no worker heartbeat in it.
    data = tmp_path_factory.mktemp("no-worker")
    proc, url = start_api(stack_env(other_db(redis_url, 5), data), data / "api.log")
    try:
        resp = httpx.get(f"{url}/readyz")
        assert resp.status_code == 503 and resp.json()["detail"] == "no worker is running"
    finally:
        stop_process(proc)
