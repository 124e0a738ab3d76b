"""Each pool process's watchdog: it ends a job whose model will not let go of the process.

A model can spin inside native code (an ONNX Loop of 2^62 iterations) where nothing in Python
reaches it: the task's thread never comes back to look at the cancel flag, and Celery's soft
time limit, an exception raised between bytecodes, never arrives. A daemon thread in every pool
process watches the task that process runs (:func:`begin` … :func:`end`, called by
:class:`~smoothcert.worker.queue.liveness.LeasedTask`) and the batches of its certification
(:func:`batches`, called by the job runner). It ends the job when

* a batch runs longer than :func:`batch_limit_s`: max(``SMOOTHCERT_BATCH_DEADLINE_FLOOR_S``,
  ``SMOOTHCERT_BATCH_DEADLINE_FACTOR`` × the slowest batch this task finished). The job fails
  with a message that names the limit;
* the job was canceled (``DELETE``) and the batch in flight has not ended :data:`CANCEL_GRACE_S`
  after the watchdog saw the flag. The job is canceled. A batch that ends in time lets the
  engine stop between batches, and the process lives on;
* the task still runs at :func:`~smoothcert.service.core.queue.watchdog_time_limit_s` of
  ``SMOOTHCERT_TASK_TIME_LIMIT_S``: the job fails with the time-limit message.

Ending a job is: recording how it ended, releasing the task's lease, and exiting the process
(``os._exit``). The prefork pool starts a fresh process; the task's message goes back to the
front of its queue (:class:`~smoothcert.service.core.queue.WorkerTransport`), and its next
delivery finds the job ended and drops it. A batch is what the engine does between its cancel
check and its progress report: one model call on one batch of noisy copies. A batch still
running after :data:`REPORT_AFTER_S` is written into the process's entry for ``/readyz``
(``batch``: job, start, limit), so that a process stuck past its limit, whose watchdog could not
act, shows there. No Celery here; the task class and the runner bring the actions.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often the watchdog looks
CANCEL_POLL_S = 0.5  # how often it reads the cancel flag while a batch runs
CANCEL_GRACE_S = 2.0  # how long a canceled job's batch may still run before the process is ended
REPORT_AFTER_S = 1.0  # a batch running this long is reported for /readyz
EXIT_CODE = 70


def batch_limit_s(floor_s: float, factor: float, slowest_s: float) -> float:
    """How long the next batch may run: the floor, or ``factor`` × the slowest finished batch."""
    return max(floor_s, factor * slowest_s)


@dataclass
class Watch:
    """The task this process runs, as the watchdog sees it; the actions come from the caller."""

    task_id: str
    job_id: str | None
    limit_s: float  # SMOOTHCERT_TASK_TIME_LIMIT_S, for the message
    deadline: float  # monotonic: when the watchdog ends the task
    floor_s: float
    factor: float
    release: Callable[[], Any]  # the task's lease
    fail: Callable[[str], Any]  # the job fails with this message
    report: Callable[[dict[str, Any] | None], Any]  # a slow batch for /readyz (None: no batch)
    should_stop: Callable[[], bool] | None = None
    cancel: Callable[[], Any] | None = None
    cleanup: Callable[[], Any] | None = None
    batch_since: float | None = None  # monotonic start of the batch in flight
    batch_wall: float = 0.0  # the same, wall clock, for /readyz
    slowest_s: float = 0.0
    cancel_seen: float | None = None
    cancel_polled: float = 0.0
    reported: float | None = None  # batch_since of the batch reported
    ending: bool = False

    def batch_limit(self) -> float:
        return batch_limit_s(self.floor_s, self.factor, self.slowest_s)


_lock = threading.Lock()
_state: dict[str, Any] = {"watch": None, "thread_pid": None}


def begin(
    task_id: str,
    job_id: str | None,
    *,
    limit_s: float,
    end_after_s: float,
    floor_s: float,
    factor: float,
    release: Callable[[], Any],
    fail: Callable[[str], Any],
    report: Callable[[dict[str, Any] | None], Any],
) -> Watch:
    """Watch the task starting now in this process; ``end_after_s`` from now it is ended."""
    watch = Watch(
        task_id,
        job_id,
        limit_s,
        time.monotonic() + end_after_s,
        floor_s,
        factor,
        release,
        fail,
        report,
    )
    with _lock:
        _state["watch"] = watch
        if _state["thread_pid"] != os.getpid():  # a forked pool process inherits no threads
            _state["thread_pid"] = os.getpid()
            threading.Thread(target=_run, name="smoothcert-watchdog", daemon=True).start()
    return watch


def end(watch: Watch) -> None:
    """The task returned; stop watching it. When the watchdog is ending it already, wait for the
    process to exit rather than let the task report an outcome of its own."""
    with _lock:
        ending = watch.ending
        if _state["watch"] is watch:
            _state["watch"] = None
    if ending:
        while True:
            time.sleep(60)
    if watch.reported is not None:
        watch.report(None)


def batches(
    should_stop: Callable[[], bool],
    progress: Callable[[int, int], None],
    *,
    cancel: Callable[[], Any],
    cleanup: Callable[[], Any] | None = None,
) -> tuple[Callable[[], bool], Callable[[int, int], None]]:
    """The engine's ``should_cancel`` and ``progress`` for the watched task: a batch runs from one
    to the other. ``should_stop`` is also polled by the watchdog while a batch runs; ``cancel``
    records the cancellation when it ends the job, ``cleanup`` runs after the job ended. Outside a
    watched task (a direct call) the two come back unchanged."""
    watch = _state["watch"]
    if watch is None:
        return should_stop, progress
    watch.should_stop, watch.cancel, watch.cleanup = should_stop, cancel, cleanup

    def before_batch() -> bool:
        if should_stop():
            return True
        watch.batch_wall, watch.batch_since = time.time(), time.monotonic()
        return False

    def after_batch(done: int, total: int) -> None:
        since = watch.batch_since
        if since is not None:
            watch.slowest_s = max(watch.slowest_s, time.monotonic() - since)
            watch.batch_since = None
        progress(done, total)

    return before_batch, after_batch


def _run() -> None:
    while True:
        time.sleep(POLL_S)
        watch = _state["watch"]
        if watch is None or watch.ending:
            continue
        try:
            _look(watch, time.monotonic())
        except Exception:  # a Redis hiccup: look again next time
            log.exception(
                "the watchdog could not look at task %s",
                watch.task_id,
                extra={"job_id": watch.job_id},
            )


def _look(watch: Watch, now: float) -> None:
    if now >= watch.deadline:
        return _end(
            watch,
            "fail",
            f"the job exceeded the {watch.limit_s:g} s time limit "
            "(SMOOTHCERT_TASK_TIME_LIMIT_S); its worker process was replaced",
        )
    since = watch.batch_since
    if since is None:
        if watch.reported is not None:
            watch.reported = None
            watch.report(None)
        return
    limit = watch.batch_limit()
    if now - since > limit:
        return _end(
            watch,
            "fail",
            (
                f"a batch of the model ran longer than {limit:.3g} s, the limit for this job: the larger of "
                f"SMOOTHCERT_BATCH_DEADLINE_FLOOR_S ({watch.floor_s:g} s) and SMOOTHCERT_BATCH_DEADLINE_FACTOR "
                f"({watch.factor:g}) x its slowest finished batch ({watch.slowest_s:.3g} s); a model that does not "
                "return would hold the worker, so the job was stopped and its worker process replaced"
            ),
        )
    if watch.should_stop is not None and now - watch.cancel_polled >= CANCEL_POLL_S:
        watch.cancel_polled = now
        if watch.cancel_seen is None and watch.should_stop():
            watch.cancel_seen = now
    if watch.cancel_seen is not None and now - watch.cancel_seen >= CANCEL_GRACE_S:
        return _end(
            watch,
            "cancel",
            f"the job was canceled while a batch of its model ran for {now - since:.1f} s",
        )
    if watch.reported != since and now - since >= REPORT_AFTER_S:
        watch.reported = since
        watch.report(
            {
                "job_id": watch.job_id,
                "since": round(watch.batch_wall, 3),
                "limit_s": round(limit, 3),
            }
        )


def _end(watch: Watch, how: str, message: str) -> None:
    """Record the job's end, release the lease, exit the process (the task's thread cannot be stopped)."""
    with _lock:
        if _state["watch"] is not watch or watch.ending:
            return
        watch.ending = True
    log.error(
        "watchdog: %s; worker process %d exits",
        message,
        os.getpid(),
        extra={"job_id": watch.job_id},
    )
    try:
        if how == "cancel" and watch.cancel is not None:
            watch.cancel()
        else:
            watch.fail(message)
        if watch.cleanup is not None:
            watch.cleanup()
        watch.release()
    except (
        Exception
    ):  # Redis is away: the message's next delivery runs the job again (redelivery cap)
        log.exception(
            "the watchdog could not record the end of task %s",
            watch.task_id,
            extra={"job_id": watch.job_id},
        )
    finally:
        logging.shutdown()
        os._exit(EXIT_CODE)
