"""The worker's sweep of ``DATA_DIR/results``: noisy copies past ``SMOOTHCERT_SAMPLES_TTL_S`` and
the folders of jobs whose record expired (:func:`smoothcert.service.core.results.sweep`).

A daemon thread of each worker's main process (started with the heartbeat by
:mod:`smoothcert.worker.queue.liveness`) tries every few seconds; a lock key in Redis lets one
worker of all sweep per :func:`~smoothcert.service.core.results.sweep_every_s`. A thread of its
own, not the heartbeat's: a sweep of many folders must never make a worker look dead.
"""

from __future__ import annotations

import logging
import threading

import redis

from smoothcert.service.core.results import sweep_every_s, sweep_once
from smoothcert.worker.queue import context

log = logging.getLogger(__name__)


class ResultSweep:
    """The sweeping thread's loop; :meth:`run` until ``stop_event`` is set."""

    def __init__(self) -> None:
        self.stop_event = threading.Event()

    def run(self) -> None:
        ctx = context.current()
        files = ctx.results
        pause = min(5.0, sweep_every_s(files.samples_ttl_s) / 2)
        client = ctx.connect(connect_timeout_s=2, timeout_s=30)
        while not self.stop_event.wait(pause):
            try:
                swept = sweep_once(files, client)
            except redis.RedisError:
                continue  # Redis away (or full, for the lock key): the next round tries again
            except Exception:  # never let a bug end the thread
                log.exception("the sweep of %s failed", files.root)
                continue
            if swept is not None and (swept.samples or swept.folders):
                log.info(
                    "swept %d noisy-copy files and %d job folders from %s",
                    swept.samples,
                    swept.folders,
                    files.root,
                )

    def start(self) -> ResultSweep:
        threading.Thread(target=self.run, name="smoothcert-result-sweep", daemon=True).start()
        return self
