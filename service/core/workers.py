"""The workers' registry in Redis: heartbeat keys and what each pool process reports.

A worker's main process writes ``smoothcert:worker:<name>`` (a JSON record with a TTL) and its
pool processes the hash ``smoothcert:worker-procs:<name>`` (field = pid), as
:mod:`smoothcert.worker.queue.liveness` describes; ``/readyz`` and ``/metrics`` read them here.
"""
from __future__ import annotations

import json
from typing import Any

import redis

HEARTBEAT_PREFIX = "smoothcert:worker:"
PROCESSES_PREFIX = "smoothcert:worker-procs:"


def read_workers(client: redis.Redis) -> list[dict[str, Any]]:
    """Every live worker's heartbeat record with its pool processes, sorted by name."""
    keys = sorted(client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=100))
    if not keys:
        return []
    with client.pipeline(transaction=False) as pipe:
        for k in keys:
            pipe.get(k)
            pipe.hgetall(PROCESSES_PREFIX + k.decode()[len(HEARTBEAT_PREFIX):])
        replies = pipe.execute()
    workers = []
    for k, beat, procs in zip(keys, replies[::2], replies[1::2]):
        record = json.loads(beat) if beat else {}
        record["name"] = k.decode()[len(HEARTBEAT_PREFIX):]
        record["processes"] = sorted((json.loads(v) for v in procs.values()), key=lambda p: p.get("pid", 0))
        workers.append(record)
    return workers


def live_workers(client: redis.Redis) -> int:
    """Workers whose heartbeat key has not expired (SCAN by prefix, as ``/readyz`` does)."""
    return sum(1 for _ in client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=1000))
