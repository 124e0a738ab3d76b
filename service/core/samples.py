"""The shared count of Monte Carlo samples drawn: workers add to it, ``/metrics`` reads it.

A hash in Redis with the fields ``samples`` and ``seconds`` (time spent sampling), so that the
service's samples per second is one division, whichever worker drew them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import redis

from smoothcert.service.core.jobs import METRICS_PREFIX

log = logging.getLogger(__name__)
SAMPLES_KEY = METRICS_PREFIX + "samples"


def samples_drawn(rows: Iterable[dict[str, Any]], provenance: dict[str, Any]) -> int:
    """Monte Carlo samples behind result ``rows``: ``samples_used`` where a row reports it (a
    target-radius run), else its ``n`` plus the run's ``n0`` selection draws (CERTIFY; PREDICT
    draws ``n`` only)."""
    n0 = int(provenance.get("n0") or 0) if provenance.get("mode") == "certify" else 0
    return sum(
        int(r["samples_used"]) if "samples_used" in r else int(r.get("n") or 0) + n0 for r in rows
    )


def record_samples(client: redis.Redis, samples: int, seconds: float) -> None:
    """Add ``samples`` drawn in ``seconds`` of sampling to the shared counters (best effort: a
    Redis error is logged, never raised, so it cannot fail the job that drew them)."""
    if samples <= 0:
        return
    try:
        with client.pipeline() as pipe:
            pipe.hincrby(SAMPLES_KEY, "samples", int(samples))
            pipe.hincrbyfloat(SAMPLES_KEY, "seconds", max(0.0, float(seconds)))
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("could not record %d samples in the metrics: %s", samples, exc)


def record_result_samples(
    client: redis.Redis, rows: Iterable[dict[str, Any]], provenance: dict[str, Any]
) -> None:
    """:func:`record_samples` for a finished run: its rows and its provenance (``elapsed_s``)."""
    record_samples(
        client, samples_drawn(rows, provenance), float(provenance.get("elapsed_s") or 0.0)
    )
