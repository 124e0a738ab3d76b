"""Only meaningful certificates, through the real API, worker and Redis.

- models whose scores are NaN are refused at upload, and a model that turns NaN only under the
  certification's noise fails its job with a message (the worker then serves the next job);
- σ, α and n beyond the bounds of service/core/params.py are 422 naming the bound, and at the
  bounds the certificate is a finite number;
- a batch_size beyond the device's memory is lowered, recorded in the provenance, and the pool
  process's peak memory stays within the budget;
- a model's training sigma must be finite, its class names one short name per class.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from smoothcert.models.metadata import MAX_CLASS_NAME_CHARS, ModelInfo
from smoothcert.models.safetensors_io import save_safetensors_model
from tests.support.hostile_models import always_nan_onnx, nan_above_onnx, nan_weights_safetensors
from tests.support.proc import memory_bytes
from tests.support.stack import (
    ADMIN_KEY,
    USER_KEY,
    other_db,
    scratch_db,
    stack_env,
    start_api,
    start_worker,
    stop_process,
    timed_runtimes,
    upload_model_file,
    wait_job,
)

IMAGE = np.full((1, 8, 8), 0.5).tolist()
GOOD = {"sigma": 0.25, "n0": 10, "n": 100, "seed": 0}


def submit(client, **body) -> str:
    resp = client.post("/v1/certify", json=body)
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]


# --- non-finite scores -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "build", [always_nan_onnx, nan_weights_safetensors], ids=["onnx-0/0", "nan-weights"]
)
def test_a_model_returning_nan_is_refused_at_upload(admin, demo_model, data_dir, tmp_path, build):
    before = sorted(p.name for p in (data_dir / "models").iterdir())
    path = build(tmp_path / ("m.onnx" if build is always_nan_onnx else "m.safetensors"))
    resp = upload_model_file(admin, path, name="nan")
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert (
        detail.startswith("model refused:") and "NaN or infinite scores for 2 of 2 zeros" in detail
    )
    assert "a certificate needs finite scores" in detail
    assert sorted(p.name for p in (data_dir / "models").iterdir()) == before
    assert "nan" not in [m["name"] for m in admin.get("/v1/models").json()]


def test_a_model_nan_under_the_certification_noise_fails_its_job_and_the_worker_goes_on(
    client, admin, demo_model, tmp_path
):
    resp = upload_model_file(
        admin, nan_above_onnx(tmp_path / "nan-above.onnx"), name="nan-above-2.5"
    )
    assert resp.status_code == 201, resp.text  # finite on zeros, on [0, 1] images and mild noise
    # σ = 1 around 0.5: a pixel beyond 2.5 in about 3 of 4 copies.
    job = wait_job(
        client,
        submit(client, model_id=resp.json()["id"], inputs=IMAGE, sigma=1.0, n0=100, n=1000, seed=0),
        timeout=120,
    )
    assert job["status"] == "failed" and job["result"] is None
    match = re.fullmatch(
        r"the model returned non-finite scores \(NaN or infinite\) for (\d+) of 1100 noisy "
        r"copies; no certificate can rest on them",
        job["error"],
    )
    assert match and 0 < int(match.group(1)) < 1100, job["error"]
    after = wait_job(
        client, submit(client, model_id=demo_model["id"], inputs=IMAGE, **GOOD), timeout=120
    )
    assert after["status"] == "succeeded", after["error"]


# --- bounds of sigma, alpha and n --------------------------------------------------------------


@pytest.mark.parametrize(
    "change,phrase",
    [
        ({"sigma": 1e308}, "less than or equal to 1000"),
        ({"sigma": 1000.5}, "less than or equal to 1000"),
        ({"alpha": 5e-324}, "alpha must lie in [1e-20, 0.5]"),
        ({"alpha": 0.9}, "alpha must lie in [1e-20, 0.5]"),
        ({"n": 5}, "n=5 is too small for alpha=0.001"),
        ({"n": 10, "bound": "top2"}, "CERTIFY needs n >= 11"),
        ({"n": 66, "alpha": 1e-20}, "CERTIFY needs n >= 67"),
    ],
)
def test_parameters_beyond_the_bounds_are_422_naming_the_bound(client, demo_model, change, phrase):
    resp = client.post(
        "/v1/certify", json={"model_id": demo_model["id"], "inputs": IMAGE, **GOOD, **change}
    )
    assert resp.status_code == 422, resp.text
    assert phrase in str(resp.json()["detail"])


def test_bounds_hold_for_multipart_and_dataset_requests_too(client, demo_model):
    resp = client.post(
        "/v1/certify",
        data={"model_id": demo_model["id"], "sigma": "1e308"},
        files={"inputs": ("x.npy", _npy(np.zeros((1, 8, 8), np.float32)))},
    )
    assert resp.status_code == 422 and "less than or equal to 1000" in str(resp.json()["detail"])
    resp = client.post(
        "/v1/certify",
        json={"model_id": demo_model["id"], "dataset_id": "d", "sigma": 0.25, "alpha": 5e-324},
    )
    assert resp.status_code == 422 and "[1e-20, 0.5]" in str(resp.json()["detail"])


def test_predict_and_a_target_radius_keep_their_own_least_n(client, demo_model):
    for extra in ({"mode": "predict", "n": 20}, {"target_radius": 0.1, "n": 5}):
        resp = client.post(
            "/v1/certify", json={"model_id": demo_model["id"], "inputs": IMAGE, **GOOD, **extra}
        )
        assert resp.status_code == 202, resp.text


def test_at_the_bounds_the_certificate_is_finite_in_json_and_tsv(client, demo_model):
    job = wait_job(
        client,
        submit(
            client,
            model_id=demo_model["id"],
            inputs=IMAGE,
            sigma=1000.0,
            alpha=1e-20,
            n0=10,
            n=200,
            seed=0,
        ),
        timeout=120,
    )
    assert job["status"] == "succeeded", job["error"]
    (row,) = job["result"]["results"]
    cap = 1000.0 * _norm_ppf(1e-20 ** (1 / 200))
    assert row["radius_cap"] == pytest.approx(cap, rel=1e-9) and row["radius_cap"] > 0
    assert (
        isinstance(row["radius"], float)
        and math.isfinite(row["radius"])
        and 0 <= row["radius"] <= cap
    )
    tsv = client.get(f"/v1/jobs/{job['id']}/results.tsv").text
    assert "inf" not in tsv and "nan" not in tsv.lower()


# --- batch_size and memory ---------------------------------------------------------------------


def test_a_batch_size_beyond_the_devices_memory_is_lowered_and_recorded(client, demo_model):
    job = wait_job(
        client,
        submit(
            client,
            model_id=demo_model["id"],
            inputs=IMAGE,
            sigma=0.25,
            n0=100,
            n=20_000,
            batch_size=1_000_000,
            seed=0,
        ),
        timeout=300,
    )
    assert job["status"] == "succeeded", job["error"]
    provenance = job["result"]["provenance"]
    assert provenance["requested_batch_size"] == 1_000_000
    used = provenance["batch_size"]
    assert used < 1_000_000 and used & (used - 1) == 0  # a power of two


BUDGET = 64 << 20


@pytest.fixture(scope="module")
def small_budget_stack(redis_url, tmp_path_factory, demo_paths):
    """An API and a worker whose batches may take BUDGET bytes, on a database of their own."""
    data = tmp_path_factory.mktemp("batch-memory")
    with scratch_db(redis_url, 11):
        env = stack_env(other_db(redis_url, 11), data, SMOOTHCERT_BATCH_MEMORY_BYTES=str(BUDGET))
        worker, _ = start_worker(env, data / "worker.log", "budget@%h")
        api, url = start_api(env, data / "api.log")
        try:
            with httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=90
            ) as admin:
                resp = upload_model_file(admin, demo_paths["safetensors"], name="digits")
            assert resp.status_code == 201, resp.text
            # The worker times the model's runtimes after answering the upload: let it finish, so
            # that what the test measures afterwards is the job's alone.
            timed_runtimes(data, resp.json()["sha256"])
            with httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=90
            ) as client:
                yield client, resp.json()
        finally:
            stop_process(api)
            stop_process(worker)


def _pool_pid(client) -> int:
    (worker,) = client.get("/readyz").json()["worker_details"]
    (process,) = worker["processes"]
    return process["pid"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_a_million_copies_per_batch_stay_within_the_workers_budget(small_budget_stack):
    client, model = small_budget_stack
    pid = _pool_pid(client)  # the pool process that checked the model at upload
    before = memory_bytes(pid)
    # 100,100 copies of one input: asked for in one batch, about 4 GB of digits_cnn activations
    # (runtime torch: the figures below are the torch module's layer results).
    job = wait_job(
        client,
        submit(
            client,
            model_id=model["id"],
            inputs=IMAGE,
            sigma=0.25,
            n0=100,
            n=100_000,
            batch_size=1_000_000,
            seed=0,
            runtime="torch",
        ),
        timeout=600,
    )
    assert job["status"] == "succeeded", job["error"]
    provenance = job["result"]["provenance"]
    # digits_cnn: 256 bytes of noise, 54,568 of layer results, 90 of scores, 64 of counting a copy
    assert (
        provenance["batch_size"]
        == 1024
        == 1 << (BUDGET // (256 + 54_568 + 90 + 64)).bit_length() - 1
    )
    assert _pool_pid(client) == pid and memory_bytes(pid) - before < 8 * BUDGET


# --- a model's training sigma and class names --------------------------------------------------


@pytest.mark.parametrize(
    "fields,phrase",
    [
        ({"sigma": "inf"}, "sigma must be a non-negative number, and finite"),
        ({"sigma": "Infinity"}, "sigma must be a non-negative number, and finite"),
        ({"sigma": "-1e400"}, "sigma must be"),
        (
            {"class_names": json.dumps(["c"] * 9), "num_classes": "10"},
            "9 class_names given for 10 classes",
        ),
        ({"class_names": json.dumps(["c"] * 1_000)}, "1000 class_names given for 10 classes"),
        ({"class_names": json.dumps(["c"] * 9 + [""])}, "class_names[9] has 0 characters"),
        (
            {"class_names": json.dumps(["c"] * 9 + ["x" * 10_000])},
            f"each name must have 1 to {MAX_CLASS_NAME_CHARS}",
        ),
    ],
)
def test_bad_training_sigma_and_class_names_are_refused(
    admin, demo_model, demo_paths, data_dir, fields, phrase
):
    before = sorted(p.name for p in (data_dir / "models").iterdir())
    resp = upload_model_file(admin, demo_paths["onnx"], name="bad-fields", **fields)
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    if isinstance(detail, list):  # refused by the form's strict number type before the model check
        assert "sigma" in fields and [e["loc"][-1] for e in detail] == ["sigma"], detail
    else:
        assert detail.startswith("model refused:") and phrase in detail
    assert sorted(p.name for p in (data_dir / "models").iterdir()) == before


def test_a_file_claiming_an_infinite_training_sigma_is_refused(admin, tmp_path):
    from smoothcert.models.architectures import build_network

    info = ModelInfo(
        format="safetensors",
        input_shape=(1, 8, 8),
        num_classes=10,
        arch="digits_cnn",
        sigma=math.inf,
    )
    path = save_safetensors_model(
        tmp_path / "inf-sigma.safetensors", build_network("digits_cnn", 10), info
    )
    resp = upload_model_file(admin, path)
    assert resp.status_code == 422 and "finite" in resp.json()["detail"], resp.text
    assert all(
        m.get("sigma") is None or math.isfinite(m["sigma"]) for m in admin.get("/v1/models").json()
    )


def test_good_class_names_and_sigma_are_stored(admin, demo_paths):
    names = [f"digit {i}" for i in range(10)]
    resp = upload_model_file(admin, demo_paths["onnx"], class_names=json.dumps(names), sigma="0.25")
    assert resp.status_code == 201, resp.text
    assert resp.json()["class_names"] == names and resp.json()["sigma"] == 0.25
    assert admin.delete(f"/v1/models/{resp.json()['id']}").status_code == 204


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _norm_ppf(p: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(p))
