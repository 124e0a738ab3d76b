"""The per-owner count of active jobs, kept by the job records' own Lua scripts, on a real Redis."""

from __future__ import annotations

import pytest

from smoothcert.service.core.job_chunks import ChunkLedger
from smoothcert.service.core.jobs import (
    ActiveJobsExceeded,
    JobStore,
    active_jobs,
    new_job_id,
    owner_key,
)
from tests.support.stack import scratch_db


@pytest.fixture
def store(redis_url):
    with scratch_db(redis_url, 14) as client:
        yield JobStore(client, ttl_s=60)


def test_create_refuses_past_the_quota_and_every_end_frees_a_slot(store):
    ids = [new_job_id() for _ in range(4)]
    for job_id in ids[:3]:
        store.create(job_id, "certify", {}, owner="alice", max_active=3)
    with pytest.raises(ActiveJobsExceeded) as info:
        store.create(ids[3], "certify", {}, owner="alice", max_active=3)
    assert (info.value.active, info.value.quota) == (3, 3)
    assert store.get(ids[3]) is None  # nothing written
    store.create(new_job_id(), "certify", {}, owner="bob", max_active=3)  # another owner
    store.create(new_job_id(), "check_model", {})  # no owner: counted nowhere
    assert active_jobs(store.redis, "alice") == 3 and active_jobs(store.redis, "bob") == 1

    assert (
        store.start(ids[0]) == 1 and active_jobs(store.redis, "alice") == 3
    )  # running still counts
    assert store.succeed(ids[0], {"results": []})
    store.request_cancel(ids[1])
    ChunkLedger(store).start(ids[2], 0)  # a dataset job's chunk turns it running
    assert store.fail(ids[2], "chunk 0 broke")
    assert active_jobs(store.redis, "alice") == 0
    assert not store.fail(ids[2], "again")  # a finished job stays finished, uncounted
    store.create(ids[3], "certify", {}, owner="alice", max_active=3)
    assert active_jobs(store.redis, "alice") == 1


def test_a_record_created_again_moves_between_owners_and_expired_ones_do_not_count(store):
    job_id = new_job_id()
    store.create(job_id, "certify", {}, owner="alice", max_active=1)
    store.create(job_id, "certify", {}, owner="bob", max_active=1)
    assert (active_jobs(store.redis, "alice"), active_jobs(store.redis, "bob")) == (0, 1)
    # A record that expired while queued: its member stays until its score (the expiry) passes.
    store.redis.zadd(owner_key("bob"), {job_id: 1})
    assert active_jobs(store.redis, "bob") == 0
    store.create(new_job_id(), "certify", {}, owner="bob", max_active=1)
    assert store.redis.zcard(owner_key("bob")) == 1  # the expired member was dropped
