"""Redis by design: what grows with a job lives on the data volume, Redis has a memory budget with
noeviction, a full Redis is a 503 that says so, and /readyz and /metrics show the budget.

- a job's noisy copies are files under DATA_DIR/results/<id>/samples (none in Redis), and the
  samples route serves them; past SMOOTHCERT_SAMPLES_TTL_S the workers' sweep deletes them, and
  the folder of a job whose record is gone;
- a large job's rows are beside them (rows.json), its record stays small, and GET and the TSV
  still return every row, exactly as an inline record returns them;
- Redis runs with maxmemory and noeviction; a Redis at its budget makes the API answer 503 with
  Retry-After, /readyz 503 "Redis is full", and /metrics keeps answering.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from smoothcert.service.api.pictures import sample_strip_png
from smoothcert.service.core.jobs import ROWS_INLINE_BYTES, JobStore, new_job_id
from smoothcert.service.core.redis_memory import POLICY
from smoothcert.service.core.results import ResultFiles
from smoothcert.service.core.settings import DEFAULT_REDIS_MAXMEMORY
from smoothcert.service.core.tsv import format_tsv
from smoothcert.service.devstack.redis_server import RedisServer
from tests.service.api.test_metrics import parse, value
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

pytestmark = pytest.mark.process  # Redis servers and APIs of their own

SWEEP_DB = 14
SAMPLES_TTL_S = 2


@pytest.fixture(scope="module")
def digits(demo_paths):
    return np.load(demo_paths["test_x"]), np.load(demo_paths["test_y"])


def certify(client: httpx.Client, model_id: str, x, y=None, **params) -> dict:
    body = {"model_id": model_id, "inputs": x.tolist(), "sigma": 0.25, "n0": 10, "n": 50, **params}
    if y is not None:
        body["labels"] = y.tolist()
    resp = client.post("/v1/certify", json=body)
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"])
    assert job["status"] == "succeeded", job["error"]
    return job


def job_keys(r: redis.Redis, job_id: str) -> list[str]:
    return sorted(k.decode() for k in r.scan_iter(match=f"*{job_id}*"))


# --- the session's stack ----------------------------------------------------------------------


def test_noisy_copies_are_files_on_the_data_volume_and_the_route_serves_them(
    client, demo_model, digits, data_dir, redis_url
):
    job = certify(client, demo_model["id"], digits[0][:3], seed=11)
    folder = data_dir / "results" / job["id"] / "samples"
    assert sorted(p.name for p in folder.iterdir()) == ["0.npy", "1.npy", "2.npy"]
    r = redis.Redis.from_url(redis_url)
    assert job_keys(r, job["id"]) == [JobStore.key(job["id"])]  # the record only: no :samples
    # A small result's rows stay in its record, beside the summary (not a second whole copy).
    fields = {k.decode() for k in r.hkeys(JobStore.key(job["id"]))}
    assert {"rows", "result_summary"} <= fields and not {"result", "rows_on_disk"} & fields
    for row in range(3):
        copies = np.load(folder / f"{row}.npy", allow_pickle=False)
        assert copies.shape == (8, 1, 8, 8) and copies.dtype == np.uint8
        resp = client.get(f"/v1/jobs/{job['id']}/samples.png", params={"row": row})
        assert resp.status_code == 200 and resp.content == sample_strip_png(copies)
    resp = client.get(f"/v1/jobs/{job['id']}/samples.png", params={"row": 3})
    assert resp.status_code == 404 and "first rows" in resp.json()["detail"]
    # The inputs' folder went with the job; the results' folder stays.
    assert not (data_dir / "jobs" / job["id"]).exists()


def test_a_large_jobs_record_stays_small_and_get_returns_every_row(
    client, demo_model, digits, data_dir, redis_url
):
    x, y = digits[0][:64], digits[1][:64]
    job = certify(client, demo_model["id"], x, y, seed=12)
    rows = job["result"]["results"]
    assert [r["index"] for r in rows] == list(range(64))
    assert [r["label"] for r in rows] == y.tolist()
    on_disk = json.loads((data_dir / "results" / job["id"] / "rows.json").read_text())
    assert on_disk == rows
    rows_bytes = len(json.dumps(rows))
    assert rows_bytes > 3 * ROWS_INLINE_BYTES
    r = redis.Redis.from_url(redis_url)
    key = JobStore.key(job["id"])
    fields = {k.decode() for k in r.hkeys(key)}
    assert not {"result", "rows"} & fields and r.hget(key, "rows_on_disk") == b"64"
    summary = json.loads(r.hget(key, "result_summary"))
    assert summary == {**job["result"], "results": None}
    record_bytes = r.memory_usage(key, samples=0)
    assert record_bytes < 4096 < rows_bytes, (record_bytes, rows_bytes)
    tsv = client.get(f"/v1/jobs/{job['id']}/results.tsv")
    assert tsv.status_code == 200
    assert tsv.text == format_tsv(rows, {r["index"]: r["label"] for r in rows})
    assert len(tsv.text.splitlines()) == 65
    assert client.get(f"/v1/jobs/{job['id']}/curve.svg").status_code == 200
    listed = client.get("/v1/jobs", params={"limit": 5}).json()["jobs"]
    assert next(j for j in listed if j["id"] == job["id"])["result"] == summary


def test_rows_read_back_from_disk_are_the_rows_an_inline_record_returns(redis_url, tmp_path):
    """The same result through a store with files (rows on disk) and one without (rows in the
    record): identical, key order and floats included, so the HTTP output does not change."""
    rows = [
        {"index": i, "prediction": i % 10, "radius": 0.1 + 0.2 * i, "p_a_lower": 1 / 3, "x": None}
        for i in range(200)
    ]
    result = {"results": rows, "certified_accuracy": [{"radius": 0.0, "accuracy": 0.5}]}
    with scratch_db(redis_url, 10) as r:
        read = []
        for files in (ResultFiles(tmp_path, 60), None):
            store, job_id = JobStore(r, ttl_s=600, files=files), new_job_id()
            store.create(job_id, "certify", {})
            store.start(job_id)
            assert store.succeed(job_id, result)
            read.append(store.get(job_id).result)
        assert (tmp_path / job_id).exists() is False  # the inline one wrote nothing
        assert json.dumps(read[0]) == json.dumps(read[1]) == json.dumps(result)
        store = JobStore(r, ttl_s=600, files=ResultFiles(tmp_path, 60))
        # A second call for the same result (a retry, a second combiner) keeps the rows...
        again = new_job_id()
        store.create(again, "certify", {})
        store.start(again)
        assert store.succeed(again, result) and not store.succeed(again, result)
        assert store.get(again).result == result
        assert store.get(again, rows=False).result == {**result, "results": None}
        # ...and one that loses to a cancel drops them.
        canceled = new_job_id()
        store.create(canceled, "certify", {})
        store.request_cancel(canceled)
        assert not store.succeed(canceled, result)
        assert not (tmp_path / canceled / "rows.json").exists()


def test_redis_runs_with_a_memory_budget_and_noeviction(redis_url, tmp_path):
    r = redis.Redis.from_url(redis_url)
    assert r.config_get("maxmemory") == {"maxmemory": str(DEFAULT_REDIS_MAXMEMORY)}
    assert r.config_get("maxmemory-policy") == {"maxmemory-policy": POLICY}
    with RedisServer(tmp_path / "redis", persist=False, maxmemory=64 << 20) as server:
        own = redis.Redis.from_url(server.url)
        assert own.config_get("maxmemory") == {"maxmemory": str(64 << 20)}
        assert own.config_get("maxmemory-policy") == {"maxmemory-policy": POLICY}
        own.close()


def test_metrics_and_readyz_show_redis_memory_against_its_budget(client, anonymous, redis_url):
    used = redis.Redis.from_url(redis_url).info("memory")["used_memory"]
    m = parse(anonymous.get("/metrics").text)
    assert value(m, "smoothcert_redis_memory_max_bytes") == DEFAULT_REDIS_MAXMEMORY
    assert 0.5 * used < value(m, "smoothcert_redis_memory_used_bytes") < 2 * used
    memory = client.get("/readyz").json()["redis_memory"]
    assert memory["max_bytes"] == DEFAULT_REDIS_MAXMEMORY and memory["policy"] == POLICY
    assert 0.5 * used < memory["used_bytes"] < 2 * used
    assert "redis_memory" not in anonymous.get("/readyz").json()


# --- a Redis of its own, at its budget ----------------------------------------------------------


def test_a_full_redis_is_a_503_that_says_so(tmp_path):
    with RedisServer(tmp_path / "redis", persist=False) as server:
        env = stack_env(server.url, tmp_path / "data", SMOOTHCERT_RATE_LIMIT_PER_MINUTE="60")
        proc, url = start_api(env, tmp_path / "api.log")
        r = redis.Redis.from_url(server.url)
        try:
            r.config_set("maxmemory", 1)  # below what it holds: every write is refused
            with httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=30
            ) as user:
                resp = user.post("/v1/certify", json={"model_id": "m", "inputs": [[0.5]]})
                assert resp.status_code == 503, resp.text
                assert "Redis) is full" in resp.json()["detail"]
                assert int(resp.headers["Retry-After"]) > 0
                assert user.get(f"/v1/jobs/{new_job_id()}").status_code == 404  # reads go on
                ready = user.get("/readyz")
                assert ready.status_code == 503 and ready.json()["redis"] == "full"
                assert "Redis is full" in ready.json()["detail"]
                assert ready.json()["redis_memory"]["max_bytes"] == 1
            anonymous = httpx.get(f"{url}/readyz")
            assert anonymous.json() == {
                "status": "not ready",
                "detail": "Redis is full: it refuses new jobs",
            }
            metrics = httpx.get(f"{url}/metrics")
            assert metrics.status_code == 200
            m = parse(metrics.text)
            assert value(m, "smoothcert_redis_up") == 1
            assert value(m, "smoothcert_redis_memory_max_bytes") == 1
            assert value(m, "smoothcert_redis_memory_used_bytes") > 1
        finally:
            r.close()
            stop_process(proc)


# --- a stack of its own, with noisy copies kept for 2 s -----------------------------------------


@pytest.fixture(scope="module")
def short_lived(redis_url, tmp_path_factory, demo_paths):
    tmp = tmp_path_factory.mktemp("samples-ttl")
    with scratch_db(redis_url, SWEEP_DB) as r:
        env = stack_env(
            other_db(redis_url, SWEEP_DB),
            tmp / "data",
            SMOOTHCERT_SAMPLES_TTL_S=str(SAMPLES_TTL_S),
        )
        worker, _ = start_worker(env, tmp / "worker.log", "sweep@%h")
        api, url = start_api(env, tmp / "api.log")
        admin = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=90
        )
        user = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=90
        )
        try:
            model = upload_model_file(admin, demo_paths["safetensors"], name="digits")
            assert model.status_code == 201, model.text
            yield {
                "user": user,
                "redis": r,
                "results": tmp / "data" / "results",
                "model": model.json()["id"],
            }
        finally:
            admin.close()
            user.close()
            stop_process(api)
            stop_process(worker)


def test_the_sweep_deletes_noisy_copies_past_their_ttl_and_folders_without_a_record(
    short_lived, digits
):
    user, results = short_lived["user"], short_lived["results"]
    small = certify(user, short_lived["model"], digits[0][:2], seed=13)
    large = certify(user, short_lived["model"], digits[0][:64], seed=14)
    samples: Path = results / small["id"] / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["0.npy", "1.npy"]
    served = user.get(f"/v1/jobs/{small['id']}/samples.png", params={"row": 1})
    assert served.status_code == 200 or time.time() - small["started_at"] > SAMPLES_TTL_S
    # Past the TTL the route stops serving them at once, and the sweep deletes the files.
    wait_for(lambda: not samples.exists(), 20, "the sweep of the expired noisy copies")
    resp = user.get(f"/v1/jobs/{small['id']}/samples.png", params={"row": 1})
    assert resp.status_code == 404 and "were deleted" in resp.json()["detail"]
    assert "SMOOTHCERT_SAMPLES_TTL_S" in resp.json()["detail"]
    # The small job's folder keeps what its certificate was made from (the inputs' digests and
    # names) as long as its record; the large job's rows stay with its record.
    assert [p.name for p in (results / small["id"]).iterdir()] == ["certificate_inputs.json"]
    assert (results / large["id"] / "rows.json").is_file()
    assert len(user.get(f"/v1/jobs/{large['id']}").json()["result"]["results"]) == 64
    # A record that expires (deleted here) takes its rows along at the next sweep.
    short_lived["redis"].delete(JobStore.key(large["id"]))
    wait_for(lambda: not (results / large["id"]).exists(), 20, "the sweep of a gone record's rows")
    assert user.get(f"/v1/jobs/{large['id']}").status_code == 404
