"""Task leases on a real Redis: who may run a task, and exactly-once resending of a dead worker's task.

Database 7 of the session's server, so the session worker's own reaper never sees these leases.
A worker is alive when its heartbeat key exists and names the lease's incarnation.
"""

from __future__ import annotations

import json
import time

import pytest

from smoothcert.service.core.job_chunks import ChunkLedger
from smoothcert.service.core.jobs import JobStore
from smoothcert.worker.queue.leases import LEASES_KEY, Leases
from tests.support.stack import scratch_db

PREFIX = "test:beat:"
TTL = 5


@pytest.fixture
def client(redis_url):
    with scratch_db(redis_url, 7) as c:
        yield c


def beat(client, worker: str, incarnation: str) -> None:
    client.set(PREFIX + worker, json.dumps({"incarnation": incarnation}), ex=TTL)


def later() -> float:
    return time.time() + TTL + 1


def test_a_live_worker_keeps_its_task_and_a_dead_ones_is_taken_over(client):
    leases = Leases(client, PREFIX, TTL)
    beat(client, "a", "a-1")
    first = leases.claim("job-1", "a", "a-1", 101, "smoothcert.certify", ["job-1", {"seed": 1}])
    assert first is not None and leases.get("job-1") == first
    assert (
        leases.claim("job-1", "b", "b-1", 202, "smoothcert.certify", ["job-1", {}]) is None
    )  # a is alive
    again = leases.claim(
        "job-1", "a", "a-1", 102, "smoothcert.certify", ["job-1", {}]
    )  # a's new pool process
    assert again is not None and again.token != first.token
    assert not leases.release(first)  # an old run cannot drop the new run's lease
    client.delete(PREFIX + "a")  # a's heartbeat expired
    taken = leases.claim("job-1", "b", "b-1", 202, "smoothcert.certify", ["job-1", {}])
    assert taken is not None and leases.get("job-1").worker == "b"
    assert leases.release(taken) and leases.get("job-1") is None


def test_a_restarted_worker_with_the_same_name_is_not_the_dead_one(client):
    # A container restarted after a crash keeps its hostname: same worker name, new incarnation.
    leases = Leases(client, PREFIX, TTL)
    beat(client, "host", "old")
    leases.claim("job-2", "host", "old", 7, "smoothcert.certify", ["job-2", {}])
    beat(client, "host", "new")
    assert (
        leases.claim("job-2", "other", "other-1", 8, "smoothcert.certify", ["job-2", {}])
        is not None
    )
    client.hdel(LEASES_KEY, "job-2")
    leases.claim("job-3", "host", "old", 7, "smoothcert.certify", ["job-3", {}])
    sent: list = []
    assert [
        lease.task_id for lease in leases.reap(sent.append, skip_incarnation="new", now=later())
    ] == ["job-3"]
    assert [lease.task_id for lease in sent] == ["job-3"]


def test_reap_resends_each_dead_lease_once_and_leaves_the_rest(client):
    one, two = Leases(client, PREFIX, TTL), Leases(client, PREFIX, TTL)
    beat(client, "alive", "alive-1")
    for worker, task in (("dead", "job-dead"), ("alive", "job-alive"), ("me", "job-mine")):
        one.claim(task, worker, f"{worker}-1", 1, "smoothcert.certify", [task, {"seed": 3}])
    one.claim("job-train", "dead-too", "dead-too-1", 1, "smoothcert.train", ["job-train", {}])
    sent: list = []
    now = later()
    reaped = one.reap(sent.append, skip_incarnation="me-1", now=now) + two.reap(
        sent.append, skip_incarnation="me-1", now=now
    )
    assert sorted(lease.task_id for lease in reaped) == ["job-dead", "job-train"]
    assert sorted((s.task_id, s.task, json.dumps(s.args)) for s in sent) == [
        ("job-dead", "smoothcert.certify", '["job-dead", {"seed": 3}]'),
        ("job-train", "smoothcert.train", '["job-train", {}]'),
    ]
    assert sorted(k.decode() for k in client.hkeys(LEASES_KEY)) == ["job-alive", "job-mine"]


def test_a_lease_younger_than_the_ttl_is_not_reaped(client):
    leases = Leases(client, PREFIX, TTL)
    leases.claim("job-new", "starting", "starting-1", 1, "smoothcert.certify", ["job-new", {}])
    assert leases.reap(lambda lease: pytest.fail("reaped a fresh lease")) == []
    assert leases.get("job-new") is not None


def test_a_failed_resend_puts_the_lease_back(client):
    leases = Leases(client, PREFIX, TTL)
    leases.claim("job-x", "gone", "gone-1", 1, "smoothcert.certify", ["job-x", {}])

    def broken(lease):
        raise ConnectionError("broker away")

    assert leases.reap(broken, now=later()) == []
    assert leases.get("job-x") is not None
    assert [lease.task_id for lease in leases.reap(lambda lease: None, now=later())] == ["job-x"]


def test_a_run_whose_task_was_taken_over_changes_nothing_of_its_job(client):
    """The stale run's outcome is refused (its lease fences it) even when it arrives first; the run
    holding the lease decides the job, and a store without a fence is not affected."""
    job_id = "3f2b8c1e-5d4a-4b6f-9e7d-0a1b2c3d4e5f"
    leases = Leases(client, PREFIX, TTL)
    beat(client, "a", "a-1")
    stale = leases.claim(job_id, "a", "a-1", 1, "smoothcert.certify", [job_id, {}])
    a_jobs = JobStore(client, fence=stale.fence())
    a_jobs.create(job_id, "certify", {"seed": 1}, total=10)
    assert a_jobs.start(job_id) == 1
    client.delete(PREFIX + "a")  # a's link is cut: its heartbeat expires
    [taken] = leases.reap(lambda lease: None, now=later())
    beat(client, "b", "b-1")
    fresh = leases.claim(job_id, "b", "b-1", 2, "smoothcert.certify", [job_id, {}])
    b_jobs = JobStore(client, fence=fresh.fence())
    assert b_jobs.start(job_id) == 2
    before = client.hgetall(JobStore.key(job_id))

    # a's link comes back and its run ends before b's: nothing it says is recorded.
    assert not a_jobs.succeed(job_id, {"results": [{"index": 0, "radius": 9.0}]})
    assert not a_jobs.fail(job_id, "stale")
    assert not a_jobs.mark_canceled(job_id)
    assert a_jobs.start(job_id) == 0
    assert ChunkLedger(a_jobs).store(job_id, 0, {"rows": [{"index": 0}]}) == -2
    assert client.hgetall(JobStore.key(job_id)) == before
    assert not client.exists(JobStore.key(job_id) + ":chunk_results")
    assert not leases.release(stale)  # nor can it drop b's lease

    assert ChunkLedger(b_jobs).store(job_id, 0, {"rows": [{"index": 0}]}) == 1
    assert b_jobs.succeed(job_id, {"results": [{"index": 0, "radius": 0.5}]})
    record = JobStore(client).get(job_id)
    assert record.status == "succeeded" and record.result["results"] == [
        {"index": 0, "radius": 0.5}
    ]
    assert leases.release(fresh)
    # Without a lease (released, or lost with a Redis): the job's states alone decide.
    assert not a_jobs.succeed(job_id, {"results": []})
    assert JobStore(client).get(job_id).result["results"] == [{"index": 0, "radius": 0.5}]
    assert taken.token == stale.token
