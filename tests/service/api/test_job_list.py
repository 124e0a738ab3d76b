"""``GET /v1/jobs``: a key's jobs newest first, filters, a cursor walk, keys kept apart, the index trimmed.

A second API on the session's Redis and worker serves another key, so that key's jobs are only
the ones these tests submit, whatever else the session runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from smoothcert.service.core.jobs import (
    ALL_JOBS_INDEX,
    JobStore,
    index_entry,
    new_job_id,
    owner_index_key,
)
from tests.support.stack import (
    ADMIN_KEY,
    account_key,
    scratch_db,
    stack_env,
    start_api,
    stop_process,
    wait_job,
)

OTHER = "job-list"  # an account of its own
TINY = {"inputs": np.full((1, 8, 8), 0.5).tolist(), "sigma": 0.25, "n0": 10, "n": 100}


@pytest.fixture(scope="module")
def other(redis_url, data_dir, worker) -> Iterator[httpx.Client]:
    """A client of an API of its own with a key of account OTHER (the same Redis, worker and admin
    key)."""
    proc, url = start_api(stack_env(redis_url, data_dir), data_dir / "api-other.log")
    key = account_key(url, ADMIN_KEY, OTHER)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=90) as c:
        yield c
    stop_process(proc)


@pytest.fixture(scope="module")
def submitted(other, demo_model) -> list[dict]:
    """Seven finished jobs of account OTHER in submission order: five certify, then two predict."""
    ids = []
    for i in range(7):
        body = {
            "model_id": demo_model["id"],
            **TINY,
            "seed": 100 + i,
            "mode": "predict" if i >= 5 else "certify",
        }
        resp = other.post("/v1/certify", json=body)
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["job_id"])
    return [wait_job(other, job_id) for job_id in ids]


def walk(client: httpx.Client, **query) -> list[list[dict]]:
    """Every page of ``GET /v1/jobs`` with ``query``, following next_cursor to the end."""
    pages, cursor = [], None
    while True:
        resp = client.get("/v1/jobs", params={**query, **({"cursor": cursor} if cursor else {})})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        pages.append(body["jobs"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


def test_newest_first_in_pages_without_duplicates_or_gaps(other, submitted):
    pages = walk(other, limit=3)
    assert [len(p) for p in pages] == [3, 3, 1]
    listed = [job for page in pages for job in page]
    assert [j["id"] for j in listed] == [j["id"] for j in reversed(submitted)]
    assert all(a["created_at"] >= b["created_at"] for a, b in zip(listed, listed[1:]))
    # The same object as GET /v1/jobs/{id}, but without the rows.
    job = submitted[-1]
    assert listed[0] == {**job, "result": {**job["result"], "results": None}}
    assert all(j["status"] == "succeeded" and j["result"]["results"] is None for j in listed)
    assert other.get("/v1/jobs").json()["jobs"] == listed  # default limit 20 holds all seven


def test_filters_by_kind_and_status(other, submitted):
    predict_ids = [j["id"] for j in reversed(submitted[5:])]
    assert [j["id"] for page in walk(other, kind="predict") for j in page] == predict_ids
    assert [j["id"] for page in walk(other, kind="certify", limit=2) for j in page] == [
        j["id"] for j in reversed(submitted[:5])
    ]
    assert len([j for page in walk(other, status="succeeded") for j in page]) == 7
    assert walk(other, status="queued") == [[]]
    assert walk(other, kind="train") == [[]]


def test_a_key_sees_only_its_own_jobs_and_the_admin_sees_all(
    other, submitted, client, admin, demo_model
):
    resp = client.post("/v1/certify", json={"model_id": demo_model["id"], **TINY, "seed": 1})
    assert resp.status_code == 202, resp.text
    mine = resp.json()["job_id"]
    others = {j["id"] for j in submitted}
    user_view = {j["id"] for page in walk(client, limit=100) for j in page}
    assert mine in user_view and not user_view & others
    assert {j["id"] for page in walk(other, limit=100) for j in page} == others
    admin_view = {j["id"] for page in walk(admin, limit=100) for j in page}
    assert mine in admin_view and others <= admin_view
    wait_job(client, mine)


@pytest.mark.parametrize(
    "query,phrase",
    [
        ({"status": "done"}, "status"),
        ({"kind": "dataset"}, "kind"),
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "MDAwMDAwMDAwMDAwMDAwOng"}, "cursor"),  # base64url of an entry with a bad id
    ],
)
def test_bad_filters_and_cursors_are_422(client, query, phrase):
    resp = client.get("/v1/jobs", params=query)
    assert resp.status_code == 422, resp.text
    assert phrase in str(resp.json()["detail"])


def test_the_index_never_lists_a_gone_record_and_is_trimmed_past_the_ttl(redis_url):
    with scratch_db(redis_url, 7) as r:
        store = JobStore(r, ttl_s=3600)
        old, gone, kept = new_job_id(), new_job_id(), new_job_id()
        # An entry from before the TTL (its record long expired), as an index would hold it.
        r.zadd(ALL_JOBS_INDEX, {index_entry(time.time() - 7200, old): 0})
        r.zadd(owner_index_key("o"), {index_entry(time.time() - 7200, old): 0})
        store.create(gone, "certify", {}, owner="o")
        time.sleep(0.005)  # a later millisecond: two jobs of one millisecond are ordered by id
        store.create(kept, "certify", {}, owner="o")
        entries = [e.decode()[16:] for e in r.zrange(ALL_JOBS_INDEX, 0, -1)]
        assert entries == [gone, kept]  # the old entry trimmed on create
        assert [e.decode()[16:] for e in r.zrange(owner_index_key("o"), 0, -1)] == [gone, kept]
        assert 0 < r.ttl(ALL_JOBS_INDEX) <= 3600 and 0 < r.ttl(owner_index_key("o")) <= 3600
        r.delete(JobStore.key(gone))  # a record gone before its time
        for owner in ("o", None):
            records, cursor = store.recent(owner)
            assert [j.id for j in records] == [kept] and cursor is None
        assert [e.decode()[16:] for e in r.zrange(ALL_JOBS_INDEX, 0, -1)] == [kept]
        assert store.recent("nobody") == ([], None)


def test_a_listing_reads_each_results_summary_not_its_rows(redis_url):
    """A succeeded job's record keeps its result without rows beside the rows, and the listing
    reads that; a record written before summaries existed is still listed from its full result."""
    with scratch_db(redis_url, 8) as r:
        store = JobStore(r)
        rows = [{"index": i, "prediction": 3, "radius": 0.5} for i in range(1000)]
        new, old = new_job_id(), new_job_id()
        for job_id in (old, new):
            store.create(job_id, "certify", {"sigma": 0.25}, owner="o")
            store.start(job_id)
            time.sleep(0.005)
        store.succeed(new, {"results": rows, "certified_accuracy": {"0.0": 1.0}})
        r.hset(
            JobStore.key(old),
            mapping={"status": "succeeded", "result": json.dumps({"results": rows})},
        )
        summary = json.loads(r.hget(JobStore.key(new), "result_summary"))
        assert summary == {"results": None, "certified_accuracy": {"0.0": 1.0}}
        assert (
            len(r.hget(JobStore.key(new), "result_summary"))
            < 100
            < len(r.hget(JobStore.key(new), "rows"))
        )
        assert not r.hexists(JobStore.key(new), "result")  # the summary is not kept twice
        records, _ = store.recent("o")
        assert [j.id for j in records] == [new, old]
        assert records[0].result == summary
        assert records[1].result == {"results": rows}  # the old record: read whole, as before
        assert store.get(new).result["results"] == rows  # a single job still reads its rows
