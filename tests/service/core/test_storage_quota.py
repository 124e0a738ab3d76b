"""The storage quota's Redis side on a real Redis (database 12 of the session's server) and a
temporary data dir: job inputs reserved beside datasets, given back when deleted, certificates held
for their retention, and the sweep of inputs whose job record is missing or ended."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from smoothcert.service.core.jobs import JobStore, new_job_id
from smoothcert.service.core.storage_quota import (
    INPUTS_INDEX,
    INPUTS_OWNERS,
    STORAGE_LUA,
    JobInputs,
    certificate_token,
    drop_job_inputs,
    hold_certificate,
    inputs_disk_bytes,
    npy_bytes,
    release_certificate,
    storage_keys,
    sweep_orphan_inputs,
)
from tests.support.stack import scratch_db

OWNER, QUOTA, TTL_MS = "owner-of-the-inputs", 10_000, 60_000


@pytest.fixture
def db(redis_url):
    with scratch_db(redis_url, 12) as client:
        yield client


def reserve(inputs: JobInputs, job_id: str, nbytes: int, stored: int = 0, ids=()):
    return inputs.reserve(
        OWNER, job_id, nbytes, quota=QUOTA, stored=stored, dataset_ids=list(ids), ttl_ms=TTL_MS
    )


def written(jobs_dir, job_id: str, x: np.ndarray) -> int:
    """Inputs saved as the API saves them; their size on disk."""
    (jobs_dir / job_id).mkdir(parents=True)
    np.save(jobs_dir / job_id / "inputs.npy", x)
    return (jobs_dir / job_id / "inputs.npy").stat().st_size


def aged(db, job_id: str) -> None:
    """Make the reservation of ``job_id`` look as old as the epoch."""
    db.zadd(INPUTS_INDEX, {job_id: 0})


def test_npy_bytes_is_the_size_numpy_writes_and_inputs_count_in_whole_blocks(tmp_path):
    for x in (np.zeros((3, 1, 8, 8), np.float32), np.zeros((7, 3, 5, 5), np.uint8)):
        assert npy_bytes(x) == written(tmp_path, new_job_id(), x)
    block = os.statvfs(tmp_path).f_frsize
    one = np.zeros((1, 1, 8, 8), np.float32)  # 384 bytes: a block for it, one for its folder
    assert inputs_disk_bytes(one, tmp_path) == 2 * max(512, block)


def test_job_inputs_count_beside_datasets_and_uploads_until_given_back(db):
    inputs, first, second = JobInputs(db), new_job_id(), new_job_id()
    assert reserve(inputs, first, 4000, stored=3000) == (True, 3000)
    assert reserve(inputs, second, 4000, stored=3000) == (False, 7000)  # 11,000 > 10,000
    # A dataset upload (the API's script, on the same keys) sees the inputs too.
    upload = db.register_script(STORAGE_LUA)
    assert upload(keys=storage_keys(OWNER), args=["d2", 4000, QUOTA, 3000, TTL_MS]) == [0, 7000]
    assert upload(keys=storage_keys(OWNER), args=["d2", 3000, QUOTA, 3000, TTL_MS]) == [1, 7000]
    assert db.hget(INPUTS_OWNERS, first) == OWNER.encode()
    # The upload's shorter TTL did not shorten the keys' life below the inputs'.
    assert db.pttl(storage_keys(OWNER)[1]) > TTL_MS - 5_000

    assert inputs.release(first) and not inputs.release(first)  # given back once
    assert reserve(inputs, second, 4000, stored=3000) == (True, 6000)
    assert db.zscore(INPUTS_INDEX, first) is None and db.hget(INPUTS_OWNERS, first) is None


def test_dropping_a_jobs_inputs_deletes_the_folder_and_gives_back_its_bytes(db, tmp_path):
    inputs, job_id = JobInputs(db), new_job_id()
    assert reserve(inputs, job_id, 9000)[0]
    written(tmp_path, job_id, np.zeros((2, 1, 8, 8), np.float32))
    drop_job_inputs(db, tmp_path, job_id)
    assert not (tmp_path / job_id).exists()
    assert db.hgetall(storage_keys(OWNER)[1]) == {}
    assert reserve(inputs, new_job_id(), 9000)[0]
    # A link placed where a job's folder would be is left alone (and its bytes given back).
    elsewhere, linked = tmp_path / "elsewhere", new_job_id()
    elsewhere.mkdir()
    (tmp_path / linked).symlink_to(elsewhere)
    drop_job_inputs(db, tmp_path, linked)
    assert elsewhere.is_dir()


def test_the_sweep_deletes_inputs_whose_record_is_missing_or_ended_past_the_grace(db, tmp_path):
    inputs, jobs = JobInputs(db), JobStore(db)
    x = np.zeros((4, 1, 8, 8), np.float32)
    # The API died between writing the inputs and the record: reserved, written, no record.
    orphan = new_job_id()
    assert reserve(inputs, orphan, npy_bytes(x))[0]
    written(tmp_path, orphan, x)
    # A job that ended, whose folder its worker did not delete (it died first).
    ended = new_job_id()
    assert reserve(inputs, ended, npy_bytes(x))[0]
    written(tmp_path, ended, x)
    jobs.create(ended, "certify", {}, total=1, owner=OWNER)
    assert jobs.fail(ended, "its worker gave up")
    # A queued job and a submission still between its write and its record: both stay.
    live, young = new_job_id(), new_job_id()
    for job_id in (live, young):
        assert reserve(inputs, job_id, npy_bytes(x))[0]
        written(tmp_path, job_id, x)
    jobs.create(live, "certify", {}, total=1, owner=OWNER)
    # Folders no reservation names: one older than a job record lives, one recent.
    stale, recent = new_job_id(), new_job_id()
    for job_id in (stale, recent):
        written(tmp_path, job_id, x)
    os.utime(tmp_path / stale, (time.time() - 7200, time.time() - 7200))
    for job_id in (orphan, ended, live):
        aged(db, job_id)

    swept = sweep_orphan_inputs(db, tmp_path, grace_s=60, job_ttl_s=3600)
    assert sorted(swept) == sorted([orphan, ended, stale])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, young, recent])
    held = {k.decode(): int(v) for k, v in db.hgetall(storage_keys(OWNER)[1]).items()}
    assert held == {f"job:{live}": npy_bytes(x), f"job:{young}": npy_bytes(x)}

    # One sweep per interval, whichever process asks; the next one after it.
    aged(db, young)
    assert sweep_orphan_inputs(db, tmp_path, grace_s=60, job_ttl_s=3600) == []
    db.delete("smoothcert:job-inputs:sweep")
    assert sweep_orphan_inputs(db, tmp_path, grace_s=60, job_ttl_s=3600) == [young]


def test_a_certificate_counts_against_the_quota_until_released_even_past_it(db):
    inputs, job_id, sha = JobInputs(db), new_job_id(), "ab" * 32
    hold_certificate(db, OWNER, sha, 8000, TTL_MS)
    hold_certificate(db, OWNER, sha, 8000, TTL_MS)  # issued twice (two API processes): held once
    assert db.hget(storage_keys(OWNER)[1], certificate_token(sha)) == b"8000"
    assert reserve(inputs, job_id, 4000) == (False, 8000)  # 12,000 > 10,000
    # Held even past the quota: the certificate is on disk already; what comes next is refused.
    hold_certificate(db, OWNER, "cd" * 32, 8000, TTL_MS)
    assert reserve(inputs, job_id, 1) == (False, 16000)
    release_certificate(db, OWNER, sha)
    release_certificate(db, OWNER, "cd" * 32)
    assert reserve(inputs, job_id, 4000) == (True, 0)


def test_a_held_certificate_lapses_with_its_retention(db):
    inputs, sha = JobInputs(db), "ef" * 32
    hold_certificate(db, OWNER, sha, 9000, 200)  # a retention of 0.2 s
    assert reserve(inputs, new_job_id(), 4000) == (False, 9000)
    time.sleep(0.3)
    assert reserve(inputs, new_job_id(), 4000) == (True, 0)
    assert db.hget(storage_keys(OWNER)[1], certificate_token(sha)) is None
