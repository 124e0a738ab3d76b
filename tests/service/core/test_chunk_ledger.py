"""The chunk ledger of dataset jobs on a real Redis: finished chunks' rows do not outlive a job
that ends without a result."""

from __future__ import annotations

import pytest

from smoothcert.service.core.job_chunks import ChunkLedger
from smoothcert.service.core.jobs import JobStore, new_job_id
from tests.support.stack import scratch_db


@pytest.fixture()
def ledger(redis_url):
    with scratch_db(redis_url, 10) as client:
        yield ChunkLedger(JobStore(client, ttl_s=3600))


def running_job(ledger: ChunkLedger) -> str:
    job_id = new_job_id()
    ledger.jobs.create(job_id, "certify", {"dataset_id": "d"}, total=300)
    assert ledger.start(job_id, 0) == 1
    return job_id


@pytest.mark.parametrize("end", ["mark_canceled", "fail"])
def test_the_rows_of_finished_chunks_go_when_the_job_ends_without_a_result(ledger, end):
    job_id = running_job(ledger)
    assert ledger.store(job_id, 0, {"rows": [{"index": 0}]}) == 1
    assert ledger.store(job_id, 1, {"rows": [{"index": 100}]}) == 2
    getattr(ledger.jobs, end)(*([job_id] if end == "mark_canceled" else [job_id, "a chunk failed"]))
    assert ledger.results(job_id) == {}
    # a chunk still running when the job ended cannot bring its rows back
    assert ledger.store(job_id, 2, {"rows": [{"index": 200}]}) == -1
    assert ledger.results(job_id) == {}


def test_a_running_job_keeps_each_chunks_latest_outcome(ledger):
    job_id = running_job(ledger)
    assert ledger.store(job_id, 0, {"rows": [1]}) == 1
    assert ledger.store(job_id, 0, {"rows": [2]}) == 1  # a redelivery replaces its own entry
    assert ledger.results(job_id) == {0: {"rows": [2]}}
