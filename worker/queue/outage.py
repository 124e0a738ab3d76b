"""A task's Redis calls while Redis is away for a while (restarted, failed over, a network blip).

Redis holds the job store, so a task that loses it mid-computation has two kinds of calls left:

* the job's running chatter, progress writes and cancel checks (:func:`tolerant`): one that
  cannot reach Redis is skipped (progress) or reads "not canceled" (cancel), so the
  computation goes on. One warning line per outage per process; the next call that gets
  through ends the outage;
* what must not be lost, the job's outcome and the task's lease release (:func:`persist`): the
  call is tried again with a growing pause for up to :data:`OUTCOME_RETRY_S`, then given up
  with an error line. Given up, the outcome is lost as before: the message's next delivery
  runs the job again.

Only ``redis.ConnectionError`` and ``redis.TimeoutError`` count as an outage (a Redis loading
its append-only file answers ``BusyLoadingError``, a ConnectionError), and a Redis at its memory
budget refusing writes (``OutOfMemoryError``: ``maxmemory`` with ``noeviction``), which frees
memory as records expire; any other error is raised as it is. No Celery here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

log = logging.getLogger(__name__)

OUTCOME_RETRY_S = 120.0  # how long an outcome or a lease release is tried before it is given up
FIRST_PAUSE_S = 0.25
MAX_PAUSE_S = 5.0
OUTAGE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError)

T = TypeVar("T")
_lock = threading.Lock()
_state = {"away": False}  # per process: a warning was logged and no call has got through since


def _lost(what: str, exc: BaseException, job_id: str | None) -> None:
    with _lock:
        first, _state["away"] = not _state["away"], True
    if first:
        log.warning(
            "Redis is unreachable (%s: %s); %s; the task goes on",
            type(exc).__name__,
            exc,
            what,
            extra={"job_id": job_id},
        )


def _back(job_id: str | None) -> None:
    if _state["away"]:
        with _lock:
            was, _state["away"] = _state["away"], False
        if was:
            log.warning("Redis answers again", extra={"job_id": job_id})


def tolerant(call: Callable[[], T], default: T, what: str, job_id: str | None = None) -> T:
    """``call()``, or ``default`` when Redis cannot be reached (``what`` names it in the warning)."""
    try:
        value = call()
    except OUTAGE as exc:
        _lost(what + " skipped", exc, job_id)
        return default
    _back(job_id)
    return value


def persist(
    call: Callable[[], T], what: str, job_id: str | None = None, retry_s: float = OUTCOME_RETRY_S
) -> T | None:
    """``call()``, tried again while Redis cannot be reached, for up to ``retry_s``; None when
    it was given up (logged as an error naming ``what``)."""
    deadline = time.monotonic() + retry_s
    pause = FIRST_PAUSE_S
    while True:
        try:
            value = call()
        except OUTAGE as exc:
            if time.monotonic() + pause > deadline:
                log.error(
                    "gave up on %s: Redis stayed unreachable for %g s (%s: %s)",
                    what,
                    retry_s,
                    type(exc).__name__,
                    exc,
                    extra={"job_id": job_id},
                )
                return None
            _lost(what + f" is tried again for up to {retry_s:g} s", exc, job_id)
            time.sleep(pause)
            pause = min(MAX_PAUSE_S, pause * 2)
            continue
        _back(job_id)
        return value
