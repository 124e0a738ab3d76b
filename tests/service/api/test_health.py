"""/healthz and /readyz, and 503 (not 500) when Redis cannot be reached."""
from __future__ import annotations

import httpx

from tests.support.stack import USER_KEY, other_db, stack_env, start_api, stop_process


def test_readyz_names_the_live_worker(anonymous):
    body = anonymous.get("/readyz").json()
    assert body["status"] == "ready" and body["redis"] == "ok" and body["workers"]


def test_readyz_describes_each_worker_its_device_and_loaded_models(anonymous, demo_model):
    # The upload's check ran in the worker's pool process, which keeps the model loaded.
    (worker,) = [w for w in anonymous.get("/readyz").json()["worker_details"] if w["name"].startswith("test@")]
    assert worker["queues"] == ["certify"] and worker["concurrency"] == 1 and worker["requested_device"] == "cpu"
    (process,) = worker["processes"]
    assert process["device"] == "cpu" and process["pid"] != worker["pid"]
    loaded = {m["id"]: m for m in process["models"]}
    assert loaded[demo_model["id"]]["runtime"] == "torch" and loaded[demo_model["id"]]["provider"] == "cpu"


def test_redis_unreachable_is_503(api_without_redis):
    assert httpx.get(f"{api_without_redis}/healthz").status_code == 200
    ready = httpx.get(f"{api_without_redis}/readyz")
    assert ready.status_code == 503 and "Redis unreachable" in ready.json()["detail"]
    resp = httpx.get(f"{api_without_redis}/v1/jobs/x", headers={"Authorization": f"Bearer {USER_KEY}"})
    assert resp.status_code == 503 and "unreachable" in resp.json()["detail"]


def test_readyz_without_worker_is_503(redis_url, tmp_path_factory):
    # A fresh Redis database of the session's server: reachable, but no worker heartbeat in it.
    data = tmp_path_factory.mktemp("no-worker")
    proc, url = start_api(stack_env(other_db(redis_url, 5), data), data / "api.log")
    try:
        resp = httpx.get(f"{url}/readyz")
        assert resp.status_code == 503 and resp.json()["detail"] == "no worker is running"
    finally:
        stop_process(proc)
