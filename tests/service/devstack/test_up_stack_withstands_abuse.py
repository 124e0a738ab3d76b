"""One real `smoothcert up` stack, the way `make up` runs it (generated keys and Redis password,
its own Redis, API and worker), withstands abuse: a crafted queue message, hostile images,
datasets and models, meaningless parameters, fields of the wrong type, internal keys as job ids,
a killed pool process. Each ends in a clear 4xx or a job that ends with a message, and at the end
the worker still serves a normal job.

Each case has its thorough test on the test stack (named above each test here); these are the
cheap forms, one stack for all. Models that wedge a worker (deadlines of 45-60 s) are left to
tests/worker/queue/test_wedging_models.py. The one setting changed from `make up`'s defaults is a
small per-key storage quota, so that the quota is reached cheaply.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from smoothcert.models.architectures import build_network
from smoothcert.models.metadata import ModelInfo
from smoothcert.models.safetensors_io import save_safetensors_model
from smoothcert.service.core.jobs import JobStore, new_job_id
from smoothcert.service.core.queue import CERTIFY_TASK, make_celery
from smoothcert.service.core.settings import Settings
from smoothcert.service.devstack.redis_server import free_port
from smoothcert.worker.queue.leases import LEASES_KEY
from tests.support import images
from tests.support.devstack import Up, seed_demo, up_env
from tests.support.hostile_models import always_nan_onnx, nan_weights_safetensors
from tests.support.stack import upload_dataset, upload_model_file, wait_for, wait_job

pytestmark = pytest.mark.process

STORAGE_QUOTA = (
    64 << 10
)  # one dataset of 500 8x8 uint8 digits (49,152 bytes on disk in 4 KiB blocks) fits, two do not
TINY = {"sigma": 0.25, "n0": 10, "n": 100, "seed": 0}


@pytest.fixture(scope="module")
def up(tmp_path_factory, demo_paths):
    data_dir = tmp_path_factory.mktemp("replay")
    seed_demo(data_dir, demo_paths)
    stack = Up(
        up_env(data_dir, free_port(), SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY=str(STORAGE_QUOTA))
    )
    try:
        stack.wait_banner()
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def user(up):
    """The printed API key's client: account default, whose storage quota is STORAGE_QUOTA (the
    admin account, which uploaded the demo model, is the operator's and has none)."""
    user_key = re.search(r"^API key: (\S+)", up.output, re.M).group(1)
    with httpx.Client(
        base_url=up.url, headers={"Authorization": f"Bearer {user_key}"}, timeout=120
    ) as c:
        yield c


@pytest.fixture(scope="module")
def client(up):
    """The printed admin key's client (models are uploaded here; the user key may only certify)."""
    admin_key = re.search(r"^admin key: (\S+)", up.output, re.M).group(1)
    with httpx.Client(
        base_url=up.url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=120
    ) as c:
        yield c


@pytest.fixture(scope="module")
def worker_env(up) -> dict[str, str]:
    """The environment `up` gave its worker: the Redis password it generated is in its Redis URL."""
    return up.environ(up.child("celery_app"))


@pytest.fixture(scope="module")
def broker(worker_env):
    client = redis.Redis.from_url(worker_env["SMOOTHCERT_REDIS_URL"])
    yield client
    client.close()


@pytest.fixture(scope="module")
def model(client) -> dict:
    (demo,) = [m for m in client.get("/v1/models").json() if m["name"] == "digits-demo"]
    return demo


@pytest.fixture(scope="module")
def digits(demo_paths):
    return np.load(demo_paths["test_x"]), np.load(demo_paths["test_y"])


def certify(client, model, **body) -> httpx.Response:
    return client.post("/v1/certify", json={"model_id": model["id"], **TINY, **body})


def submit(client, model, **body) -> str:
    resp = certify(client, model, **body)
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]


def detail(resp: httpx.Response, status: int = 422):
    assert resp.status_code == status, resp.text
    return resp.json()["detail"]


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def worker_log(up: Up) -> list[str]:
    return (up.data_dir / "logs" / "worker.log").read_text(errors="replace").splitlines()


# In full: test_crafted_messages, test_redis_server, test_stack.
def test_redis_wants_the_password_and_the_worker_drops_a_crafted_message(
    up, client, model, worker_env, broker, digits, tmp_path
):
    port = int(re.search(r"@127\.0\.0\.1:(\d+)/", worker_env["SMOOTHCERT_REDIS_URL"]).group(1))
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, socket_timeout=5).keys()
    victim = tmp_path / "victim"
    victim.mkdir()
    np.save(victim / "inputs.npy", digits[0][:2])
    (victim / "keep.txt").write_text("still here")
    sender = make_celery(
        Settings(redis_url=worker_env["SMOOTHCERT_REDIS_URL"], data_dir=up.data_dir)
    )
    params = {
        "model_id": model["id"],
        "mode": "certify",
        "sigma": 0.25,
        "n0": 10,
        "n": 50,
        "alpha": 0.001,
        "bound": "clopper-pearson",
        "batch_size": None,
        "seed": 3,
        "num_inputs": 2,
    }
    spec = {**params, "inputs_path": str(victim / "inputs.npy"), "labels": None, "radii": None}
    ghost = new_job_id()  # no record: dropped with a log line
    sender.send_task(CERTIFY_TASK, args=[ghost, spec], task_id=ghost)
    forged = new_job_id()  # a forged record: the inputs come from its id, which has none
    JobStore(broker, ttl_s=600).create(forged, "certify", params, total=2 * 60)
    sender.send_task(CERTIFY_TASK, args=[forged, spec], task_id=forged)
    record = wait_job(client, forged)
    assert record["status"] == "failed" and record["result"] is None
    assert record["error"] == (
        f"the saved inputs of job {forged} are missing from the data dir (jobs/{forged}/inputs.npy)"
    )
    dropped = wait_for(
        lambda: [
            json.loads(line) for line in worker_log(up) if ghost in line and "dropped a " in line
        ],
        60,
        "the worker's drop line",
    )
    assert dropped[0]["message"].endswith(
        f"there is no record of job {ghost}; nothing was run and no file was touched"
    )
    assert (victim / "keep.txt").read_text() == "still here" and len(
        np.load(victim / "inputs.npy")
    ) == 2
    assert client.get(f"/v1/jobs/{ghost}").status_code == 404


# In full: test_image_inputs.
def test_a_huge_image_small_on_the_wire_is_refused_from_its_header(client, model):
    huge = images.huge_bilevel(13000, 13000)
    resp = client.post(
        "/v1/certify",
        data={"model_id": model["id"], "sigma": "0.25"},
        files=[("inputs", ("huge.png", huge, "image/png"))],
    )
    assert detail(resp) == (
        "huge.png: 13000x13000 pixels (width x height), the model takes 8x8; "
        "resize it first (nothing is resized here)"
    )


# In full: test_quotas.
def test_datasets_are_stored_in_their_dtype_and_a_key_has_a_storage_quota(user):
    client = user
    data = npz(x=np.zeros((500, 1, 8, 8), dtype=np.uint8), y=np.zeros(500, dtype=np.int64))
    first = upload_dataset(client, data)
    assert first.status_code == 201, first.text
    record = first.json()
    try:
        # uint8 pixels as uploaded (no float32 copy), int64 labels, two .npy headers
        assert (
            record["source_dtype"] == "uint8"
            and record["stored_bytes"] == 500 * 64 + 500 * 8 + 2 * 128
        )
        second = upload_dataset(client, data)
        if second.status_code == 201:
            client.delete(f"/v1/datasets/{second.json()['id']}")
        text = detail(second, 413)
        assert (
            "storage quota" in text
            and f"already uses {record['disk_bytes']} of its {STORAGE_QUOTA} bytes" in text
        )
        assert "SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY" in text
    finally:
        assert client.delete(f"/v1/datasets/{record['id']}").status_code == 204
    again = upload_dataset(client, data)  # deleting freed the room
    assert again.status_code == 201, again.text
    assert client.delete(f"/v1/datasets/{again.json()['id']}").status_code == 204


# In full: test_meaningful_certificates.
@pytest.mark.parametrize(
    "build,name",
    [(always_nan_onnx, "m.onnx"), (nan_weights_safetensors, "m.safetensors")],
    ids=["onnx-0/0", "nan-weights"],
)
def test_models_whose_scores_are_nan_are_refused(client, tmp_path, build, name):
    text = detail(upload_model_file(client, build(tmp_path / name), name="nan"))
    assert text.startswith("model refused:") and "NaN or infinite scores" in text


# In full: test_meaningful_certificates.
@pytest.mark.parametrize(
    "change,phrase",
    [
        ({"sigma": 1e308}, "less than or equal to 1000"),
        ({"alpha": 5e-324}, "alpha must lie in [1e-20, 0.5]"),
    ],
)
def test_parameters_that_give_meaningless_certificates_are_refused(
    client, model, digits, change, phrase
):
    assert phrase in str(detail(certify(client, model, inputs=digits[0][:1].tolist(), **change)))


# In full: test_image_inputs.
REFUSED = [
    ("apng.png", images.frames("PNG"), "apng.png: 3 frames (an animated or multi-picture PNG)"),
    (
        "cmyk.jpg",
        images.save(Image.new("CMYK", (8, 8), (0, 0, 0, 128)), "JPEG"),
        "cmyk.jpg: a CMYK JPEG; convert it to RGB with its colour profile first",
    ),
    (
        "clear.png",
        images.save(Image.new("RGBA", (8, 8), (9, 9, 9, 0))),
        "clear.png: 64 of 64 pixels are not fully opaque",
    ),
]


def test_a_16_bit_image_is_scaled_and_the_unconvertible_ones_are_refused(client, model, digits):
    form = {
        "model_id": model["id"],
        "sigma": "0.25",
        "n0": "20",
        "n": "200",
        "seed": "0",
        "mode": "predict",
    }
    predictions = []
    for name, data in (
        ("d8.png", images.grey8(digits[0][3][0])),
        ("d16.png", images.grey16(digits[0][3][0])),
    ):
        resp = client.post("/v1/certify", data=form, files=[("inputs", (name, data, "image/png"))])
        assert resp.status_code == 202, resp.text
        job = wait_job(client, resp.json()["job_id"])
        assert job["status"] == "succeeded", job["error"]
        predictions.append(job["result"]["results"][0]["prediction"])
    assert (
        predictions[0] == predictions[1]
    )  # the same pixels and seed: the 16-bit copy is not clipped
    for name, data, phrase in REFUSED:
        resp = client.post("/v1/certify", data=form, files=[("inputs", (name, data, "image/png"))])
        assert detail(resp).startswith(phrase)


# In full: test_meaningful_certificates.
def test_a_batch_size_of_a_million_is_lowered_and_recorded(client, model, digits):
    job = wait_job(
        client,
        submit(client, model, inputs=digits[0][:1].tolist(), n0=100, n=2_000, batch_size=1_000_000),
        timeout=300,
    )
    assert job["status"] == "succeeded", job["error"]
    provenance = job["result"]["provenance"]
    used = provenance["batch_size"]
    assert (
        provenance["requested_batch_size"] == 1_000_000
        and used < 1_000_000
        and used & (used - 1) == 0
    )


# In full: test_quotas.
def test_a_job_over_the_sample_budget_is_refused_stating_it(client, model):
    buf = io.BytesIO()
    np.save(buf, np.zeros((10_000, 1, 8, 8), dtype=np.float32))
    resp = client.post(
        "/v1/certify",
        data={"model_id": model["id"], "sigma": "0.25", "n0": "100", "n": "1000000"},
        files=[("inputs", ("x.npy", buf.getvalue()))],
    )
    text = detail(resp)
    assert "10000 inputs x 1000100 samples (n0 + n) = 10001000000 samples" in text
    assert "budget of 2000000000 samples per job (SMOOTHCERT_MAX_JOB_SAMPLES)" in text


# In full: test_jobs.
def test_internal_keys_are_not_job_ids(client, model, digits):
    job_id = submit(client, model, inputs=digits[0][:1].tolist())
    for name in (
        f"{job_id}:chunk_done",
        f"{job_id}:chunk_results",
        f"{job_id}:chunk_deliveries",
        f"{job_id}:cancel",
    ):
        for resp in (client.get(f"/v1/jobs/{name}"), client.delete(f"/v1/jobs/{name}")):
            text = detail(resp, 404)
            assert (
                text.startswith("unknown job")
                and "job ids are a UUID in lowercase hex, 8-4-4-4-12" in text
            )
    assert wait_job(client, job_id)["status"] == "succeeded"


# In full: test_strict_types.
@pytest.mark.parametrize(
    "change,loc,message",
    [
        ({"n": "1000"}, ["n"], "valid integer"),
        ({"labels": ["3"]}, ["labels", 0], "valid integer"),
        ({"seed": True}, ["seed"], "valid integer"),
    ],
    ids=["n-string", "label-string", "seed-bool"],
)
def test_fields_of_the_wrong_type_are_refused_by_name(client, model, digits, change, loc, message):
    errors = detail(certify(client, model, inputs=digits[0][:1].tolist(), **change))
    assert any(e["loc"][1:] == loc and message in e["msg"] for e in errors), errors


def test_string_pixels_are_refused(client, model):
    inputs = np.full((1, 1, 8, 8), 0.5).tolist()
    inputs[0][0][2][5] = "0.5"
    assert detail(certify(client, model, inputs=inputs)) == (
        "inputs must be a rectangular nested list of numbers: inputs[0][0][2][5] is the string '0.5', not a number"
    )


# In full: test_worker_crash; here the cheap form. A whole worker killed ends `up` (it stops when
# a child dies); its pool process killed mid-job is what `up` lives through: the job is sent again
# at once.
def test_a_job_whose_pool_process_is_killed_is_run_again_and_succeeds(
    client, model, digits, broker
):
    job_id = submit(client, model, inputs=digits[0][:2].tolist(), n0=100, n=10_000, batch_size=200)

    def running_lease():
        record = client.get(f"/v1/jobs/{job_id}").json()
        assert record["status"] in ("queued", "running"), (
            record
        )  # it must still be running to be killed
        return record["progress"]["done"] > 0 and broker.hget(LEASES_KEY, job_id)

    os.kill(
        json.loads(wait_for(running_lease, 120, "the job's first batch"))["pid"], signal.SIGKILL
    )
    record = wait_job(client, job_id, timeout=180)
    assert record["status"] == "succeeded", record["error"]
    assert int(broker.hget(f"smoothcert:job:{job_id}", "deliveries")) == 2


# In full: test_health, test_meaningful_certificates, test_datasets, test_logs.
def test_readyz_tells_nothing_without_a_key(up, client):
    keyed = client.get("/readyz").json()
    anonymous = httpx.get(f"{up.url}/readyz", timeout=10)
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready"}
    assert keyed["workers"] and not any(name in anonymous.text for name in keyed["workers"])


def test_class_names_are_bounded(client, demo_paths):
    names = json.dumps(["c"] * 1000)
    text = detail(
        upload_model_file(client, demo_paths["onnx"], name="many-names", class_names=names)
    )
    assert text.startswith("model refused:") and "1000 class_names given for 10 classes" in text


def test_an_infinite_training_sigma_is_refused(client, tmp_path):
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
    assert "finite" in detail(upload_model_file(client, path))
    assert all(
        m.get("sigma") is None or math.isfinite(m["sigma"]) for m in client.get("/v1/models").json()
    )


def test_a_canceled_dataset_jobs_chunk_results_go_at_once(client, model, digits, broker):
    # Three chunks of 100 (SMOOTHCERT_CHUNK_SIZE): canceled once the first has stored its rows.
    dataset = upload_dataset(
        client, npz(x=(digits[0][:300] * 255).round().astype(np.uint8), y=digits[1][:300])
    )
    assert dataset.status_code == 201, dataset.text
    job_id = submit(client, model, dataset_id=dataset.json()["id"], n0=10, n=300, batch_size=500)
    results = f"smoothcert:job:{job_id}:chunk_results"
    wait_for(lambda: broker.hlen(results) >= 1, 120, "the first chunk's rows")
    assert client.delete(f"/v1/jobs/{job_id}").status_code in (200, 202)
    assert wait_job(client, job_id)["status"] == "canceled"
    assert not broker.exists(results)
    assert client.delete(f"/v1/datasets/{dataset.json()['id']}").status_code == 204


def test_onnxruntime_writes_no_line_of_its_own_into_the_worker_log(up, client, demo_paths, digits):
    resp = upload_model_file(client, demo_paths["onnx"], name="digits-onnx")
    assert resp.status_code == 201, resp.text
    job = wait_job(client, submit(client, resp.json(), inputs=digits[0][:1].tolist()))
    assert job["status"] == "succeeded", job["error"]
    assert [line for line in worker_log(up) if "onnxruntime" in line and not _is_json(line)] == []


def _is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def test_after_all_of_them_the_worker_serves_a_normal_certify_job(client, model, digits):
    job = wait_job(
        client,
        submit(
            client,
            model,
            inputs=digits[0][:2].tolist(),
            labels=digits[1][:2].tolist(),
            n0=100,
            n=1_000,
        ),
        timeout=120,
    )
    assert job["status"] == "succeeded", job["error"]
    assert [row["label"] for row in job["result"]["results"]] == digits[1][:2].tolist()
