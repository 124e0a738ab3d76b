"""Dataset jobs in chunks: how a job is split, each chunk's seed, and the chunks' Redis ledger.

A dataset job certifies inputs ``[skip, skip + count)`` of a dataset as chunks of
``chunk_size`` consecutive inputs, one Celery task each, so any number of workers share it.
Chunk ``i`` draws its noise from
:func:`~smoothcert.service.core.contract.chunk_seed` ``(seed, i)``: a job is reproducible, row for
row, given its seed, dataset, skip/limit, chunk size, batch size and device, whichever worker
runs which chunk.

Beside the job record (:mod:`smoothcert.service.core.jobs`) a job keeps three hashes, field = chunk
index: ``:chunk_done`` (samples drawn; the record's ``done`` is their sum, kept by one Lua
script), ``:chunk_deliveries`` (the redelivery cap counts per chunk) and ``:chunk_results`` (each
finished chunk's rows as JSON). A redelivered chunk recomputes and overwrites its own entries
only. Once ``:chunk_results`` holds every chunk, whichever chunk task sees that combines them;
two may race, but the result is the same and the job turns succeeded once (the record's
transition script), so the step needs no lock.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from smoothcert.service.core.jobs import CANCELED, FAILED, TRACK_LUA, Fence, JobStore, fence_lua

log = logging.getLogger(__name__)

# KEYS[1] record, KEYS[2] deliveries; ARGV[1] chunk, ARGV[2] now, ARGV[3] ttl.
# A queued or running job turns (stays) running; returns the chunk's delivery count, 0 otherwise.
# track() keeps the jobs-by-state metrics in step (see smoothcert.service.core.jobs).
_START = (
    TRACK_LUA
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running')
track(KEYS[1], redis.call('HGET', KEYS[1], 'kind') or '', status, 'running')
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[2])
local deliveries = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('EXPIRE', KEYS[2], ARGV[3])
return deliveries
"""
)

# KEYS[1] record, KEYS[2] chunk results, KEYS[3] the fence's hash; ARGV[1] chunk, ARGV[2] its
# outcome (JSON), ARGV[3] ttl, ARGV[4] and ARGV[5] the fence's field and token. Keeps the outcome
# only while the job runs (a canceled or failed job's results are dropped by its transition, and
# none may come back) and the fence holds; returns how many chunks have one, -1 or -2 (fenced).
_STORE = (
    fence_lua("KEYS[3]", "ARGV[4]", "ARGV[5]")
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return -1 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return redis.call('HLEN', KEYS[2])
"""
)

# KEYS[1] record, KEYS[2] per-chunk progress; ARGV[1] chunk, ARGV[2] samples done, ARGV[3] ttl.
_PROGRESS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
local done = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do done = done + tonumber(v) end
redis.call('HSET', KEYS[1], 'done', done)
return done
"""


class ChunkLedger:
    """The per-chunk state of dataset jobs; every method is one Redis round trip."""

    def __init__(self, jobs: JobStore):
        self.jobs, self.redis, self.ttl_s = jobs, jobs.redis, jobs.ttl_s
        self._start = self.redis.register_script(_START)
        self._progress = self.redis.register_script(_PROGRESS)
        self._store = self.redis.register_script(_STORE)

    def _key(self, job_id: str, what: str) -> str:
        return f"{JobStore.key(job_id)}:{what}"

    def start(self, job_id: str, index: int) -> int:
        """Mark the job running; chunk ``index``'s delivery count, or 0 when the job is over."""
        return int(
            self._start(
                keys=[JobStore.key(job_id), self._key(job_id, "chunk_deliveries")],
                args=[index, round(time.time(), 3), self.ttl_s],
            )
        )

    def set_progress(self, job_id: str, index: int, done: int) -> None:
        """Chunk ``index`` has drawn ``done`` samples; the record's ``done`` becomes the sum."""
        self._progress(
            keys=[JobStore.key(job_id), self._key(job_id, "chunk_done")],
            args=[index, int(done), self.ttl_s],
        )

    def should_stop(self, job_id: str) -> bool:
        """True once the job was canceled, or failed in another chunk."""
        with self.redis.pipeline() as pipe:
            pipe.exists(JobStore.cancel_key(job_id))
            pipe.hget(JobStore.key(job_id), "status")
            flagged, state = pipe.execute()
        return bool(flagged) or (state or b"").decode() in (CANCELED, FAILED)

    def store(self, job_id: str, index: int, payload: dict[str, Any]) -> int:
        """Keep chunk ``index``'s outcome (replacing a previous delivery's); how many chunks have
        one, or -1 when the job no longer runs, -2 when another run took this chunk's task over
        (the store's fence): nothing is kept then."""
        record = JobStore.key(job_id)
        fence_key, fence_args = Fence.keys_args(self.jobs.fence, record)
        stored = int(
            self._store(
                keys=[record, self._key(job_id, "chunk_results"), fence_key],
                args=[index, json.dumps(payload), self.ttl_s, *fence_args],
            )
        )
        if stored == -2:
            log.warning(
                "the outcome of chunk %d of job %s was not kept: another worker took its task "
                "over (this one stopped beating and its lease was reaped)",
                index,
                job_id,
                extra={"job_id": job_id},
            )
        return stored

    def results(self, job_id: str) -> dict[int, dict[str, Any]]:
        """Every stored chunk outcome by chunk index."""
        raw = self.redis.hgetall(self._key(job_id, "chunk_results"))
        return {int(k): json.loads(v) for k, v in raw.items()}

    def clear(self, job_id: str) -> None:
        """Drop the chunk state of a finished job (its record keeps the combined result)."""
        self.redis.delete(
            *(self._key(job_id, w) for w in ("chunk_results", "chunk_done", "chunk_deliveries"))
        )
