"""A worker and an API of their own, with a hostile model and a good one uploaded: the stack the
watchdog and time-limit tests put a spinning model on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.support.hostile_models import loop_on_noise_onnx
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
)


@contextmanager
def hostile_stack(
    redis_url: str, db: int, tmp: Path, demo_paths: dict, worker_name: str, **settings: str
) -> Iterator[dict[str, Any]]:
    """Database ``db`` of the session's Redis, a worker and an API with ``settings``, the
    :func:`~tests.support.hostile_models.loop_on_noise_onnx` model (``"hostile"``, which passes the
    upload check) and the demo model (``"good"``) uploaded, and two test digits (``"x"``)."""
    with scratch_db(redis_url, db) as client:
        env = stack_env(other_db(redis_url, db), tmp / "data", **settings)
        worker, name = start_worker(env, tmp / "worker.log", worker_name)
        api, url = start_api(env, tmp / "api.log")
        admin = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=90
        )
        user = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=90
        )
        anonymous = httpx.Client(base_url=url, timeout=30)
        hostile = upload_model_file(
            admin, loop_on_noise_onnx(tmp / "loop-on-noise.onnx"), name="loop-on-noise"
        )
        assert hostile.status_code == 201, hostile.text  # it passes the upload check
        good = upload_model_file(admin, demo_paths["safetensors"], name="digits")
        assert good.status_code == 201, good.text
        try:
            yield {
                "admin": admin,
                "user": user,
                "anonymous": anonymous,
                "worker": worker,
                "name": name,
                "tmp": tmp,
                "redis": client,
                "hostile": hostile.json()["id"],
                "good": good.json()["id"],
                "x": np.load(demo_paths["test_x"])[:2],
            }
        finally:
            for c in (admin, user, anonymous):
                c.close()
            stop_process(api)
            stop_process(worker)


def submit(stack: dict[str, Any], model: str, sigma: float) -> str:
    """A certify job of the two digits on ``stack[model]`` at ``sigma``, batches of 500; its id."""
    resp = stack["user"].post(
        "/v1/certify",
        json={
            "model_id": stack[model],
            "inputs": stack["x"].tolist(),
            "sigma": sigma,
            "n0": 100,
            "n": 1000,
            "seed": 3,
            "batch_size": 500,
        },
    )
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]
