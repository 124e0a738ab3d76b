"""The workers' registry in Redis: heartbeat keys and what each pool process reports.

A worker's main process writes ``smoothcert:worker:<name>`` (a JSON record with a TTL) and its
pool processes the hash ``smoothcert:worker-procs:<name>`` (field = pid), as
:mod:`smoothcert.worker.queue.liveness` describes; ``/readyz`` and ``/metrics`` read them here.
:func:`worker_trouble` says why a worker that still has a heartbeat key cannot take work.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

HEARTBEAT_PREFIX = "smoothcert:worker:"
PROCESSES_PREFIX = "smoothcert:worker-procs:"
# A pool process's watchdog looks four times a second and ends a job in well under a second; a
# batch this much past its limit means the watchdog could not act (the process is stopped, or
# native code holds it without releasing the interpreter).
STUCK_SLACK_S = 5.0


def read_workers(client: redis.Redis) -> list[dict[str, Any]]:
    """Every live worker's heartbeat record with its pool processes, sorted by name."""
    keys = sorted(client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=100))
    if not keys:
        return []
    with client.pipeline(transaction=False) as pipe:
        for k in keys:
            pipe.get(k)
            pipe.hgetall(PROCESSES_PREFIX + k.decode()[len(HEARTBEAT_PREFIX) :])
            pipe.pttl(k)
        replies = pipe.execute()
    workers = []
    for k, beat, procs, ttl_ms in zip(keys, replies[::3], replies[1::3], replies[2::3]):
        record = json.loads(beat) if beat else {}
        record["name"] = k.decode()[len(HEARTBEAT_PREFIX) :]
        if record.get("heartbeat_ttl_s") and ttl_ms is not None and ttl_ms >= 0:
            # Each beat sets the key's TTL afresh, so what it lost since tells the beat's age
            # on Redis's clock (no clock of the worker's host involved).
            record["heartbeat_age_s"] = max(0.0, float(record["heartbeat_ttl_s"]) - ttl_ms / 1000)
        record["processes"] = sorted(
            (json.loads(v) for v in procs.values()), key=lambda p: p.get("pid", 0)
        )
        workers.append(record)
    return workers


def worker_trouble(worker: dict[str, Any], now: float | None = None) -> tuple[bool, list[str]]:
    """Whether ``worker`` (a :func:`read_workers` record) cannot take work, and what is wrong with
    it: a heartbeat older than two beats (it beats every TTL/5 seconds; its main process stopped
    answering), or pool processes inside one batch past their watchdog's limit plus
    :data:`STUCK_SLACK_S`. It cannot take work when its heartbeat is stale or every pool process
    (its concurrency) is stuck."""
    now = time.time() if now is None else now
    name, notes = worker.get("name", "?"), []
    ttl, age = float(worker.get("heartbeat_ttl_s") or 0), worker.get("heartbeat_age_s")
    stale = bool(ttl and age is not None and age > 2 * ttl / 5 + 1)
    if stale:
        notes.append(
            f"worker {name} stopped answering: its last heartbeat is {age:.0f} s old "
            f"(it beats every {ttl / 5:g} s)"
        )
    stuck = []
    for proc in worker.get("processes", []):
        batch = proc.get("batch")
        if (
            isinstance(batch, dict)
            and now > float(batch["since"]) + float(batch["limit_s"]) + STUCK_SLACK_S
        ):
            stuck.append(proc)
            notes.append(
                f"worker {name}: pool process {proc.get('pid')} has been inside one batch of job "
                f"{batch.get('job_id')} for {now - float(batch['since']):.0f} s, past its watchdog's "
                f"limit of {float(batch['limit_s']):g} s"
            )
    full = max(1, int(worker.get("concurrency") or 1))
    return stale or len(stuck) >= full, notes


def live_workers(client: redis.Redis) -> int:
    """Workers whose heartbeat key has not expired (SCAN by prefix, as ``/readyz`` does)."""
    return sum(1 for _ in client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=1000))
