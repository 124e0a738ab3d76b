"""A model that never returns cannot wedge a worker through its upload check.

An ONNX Loop of 2^62 iterations spins inside onnxruntime, where nothing in Python can stop it.
The worker's check gives it SMOOTHCERT_MODEL_CHECK_DEADLINE_S, then refuses it (the upload gets a
422 that says why, before the API's own wait runs out) and retires the pool process that holds
the spinning thread; the prefork pool starts a fresh one, which serves the next upload and job.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.support.hostile_models import endless_loop_onnx
from tests.support.proc import alive
from tests.support.stack import (
    ADMIN_KEY,
    USER_KEY,
    other_db,
    scratch_db,
    stack_env,
    start_api,
    start_worker,
    stop_process,
    upload_model_file,
    wait_for,
    wait_job,
)

DEADLINE_S = 3


@pytest.fixture(scope="module")
def stack(redis_url, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wedging")
    with scratch_db(redis_url, 15):
        env = stack_env(
            other_db(redis_url, 15), tmp / "data", SMOOTHCERT_MODEL_CHECK_DEADLINE_S=str(DEADLINE_S)
        )
        worker, _ = start_worker(env, tmp / "worker.log", "wedging@%h")
        api, url = start_api(env, tmp / "api.log")
        admin = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=90
        )
        user = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=90
        )
        yield {"admin": admin, "user": user, "worker": worker, "tmp": tmp}
        admin.close()
        user.close()
        stop_process(api)
        stop_process(worker)


def pool_pids(client: httpx.Client) -> set[int]:
    return {
        p["pid"] for w in client.get("/readyz").json()["worker_details"] for p in w["processes"]
    }


def test_a_model_that_never_returns_is_refused_and_its_process_replaced(stack, demo_paths):
    admin, user = stack["admin"], stack["user"]
    before = wait_for(lambda: pool_pids(admin), 30, "the pool process's report")
    resp = upload_model_file(admin, endless_loop_onnx(stack["tmp"] / "loop.onnx"), name="loop")
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert detail.startswith("model refused:") and f"within {DEADLINE_S} s" in detail
    assert "SMOOTHCERT_MODEL_CHECK_DEADLINE_S" in detail
    assert [m for m in admin.get("/v1/models").json() if m["name"] == "loop"] == []

    # The process that ran the check is gone (its spinning thread with it); the worker is not.
    def replaced() -> bool:
        return not any(alive(pid) for pid in before)

    wait_for(replaced, 60, "the retirement of the pool process that ran the check")
    assert stack["worker"].poll() is None

    # A fresh pool process serves the next upload and the next job.
    good = upload_model_file(admin, demo_paths["safetensors"], name="digits")
    assert good.status_code == 201, good.text
    x = np.load(demo_paths["test_x"])[:2]
    job = user.post(
        "/v1/certify",
        json={
            "model_id": good.json()["id"],
            "inputs": x.tolist(),
            "sigma": 0.25,
            "n0": 10,
            "n": 100,
            "seed": 0,
        },
    )
    assert job.status_code == 202, job.text
    assert wait_job(user, job.json()["job_id"], timeout=60)["status"] == "succeeded"
    # and /readyz stops listing the retired process once the heartbeat prunes it
    wait_for(lambda: pool_pids(admin).isdisjoint(before), 30, "/readyz to drop the retired process")
