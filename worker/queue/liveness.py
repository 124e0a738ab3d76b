"""Worker liveness: heartbeats, what each worker process has loaded, and requeueing a dead worker's tasks.

* The worker's main process runs a daemon thread that writes ``smoothcert:worker:<name>`` every
  TTL/5 seconds with a TTL of ``SMOOTHCERT_WORKER_HEARTBEAT_TTL_S`` (a thread, not a task, so
  the key stays fresh while the pool is busy with a long job). ``/readyz`` lists these keys.
* Each pool process reports its device and loaded models in the hash
  ``smoothcert:worker-procs:<name>`` (field = pid); the main process drops the entries of pool
  processes that are gone. Only pool processes resolve the device, so the main process never
  touches CUDA (a forked child of a CUDA-initialized parent cannot use CUDA).
* Every task runs under a lease (:mod:`smoothcert.worker.queue.leases`, via :class:`LeasedTask`) and
  under its pool process's watchdog (:mod:`smoothcert.worker.queue.watchdog`), and the heartbeat
  thread sends the tasks of dead workers again, to the front of their queues. A task that Celery's
  hard time limit killed (its watchdog could not act) has its job failed and its lease released by
  the main process, which is where Celery handles that limit. The
  heartbeat carries the worker's incarnation, drawn at each start: a worker restarted under the
  same name (a container keeps its hostname) does not vouch for the leases of the one that died.
* The heartbeat thread also sweeps away the saved inputs of jobs whose record is missing or
  ended (:func:`~smoothcert.service.core.storage_quota.sweep_orphan_inputs`: an API that died
  between writing a job's inputs and recording it, a worker that died before deleting them) and
  gives back what they held of their key's storage quota. It runs here, not in the API, because
  workers run all the time beside the data volume, on a thread already on a timer, where an
  API's own timer would sweep only while that API lives; a lock in Redis lets one worker sweep
  per interval however many run, each step may be done twice, and a sweep is a few Redis calls
  and one listing of ``DATA_DIR/jobs``, short beside a beat.
* Beside the heartbeat the main process starts the sweep of ``DATA_DIR/results``
  (:mod:`smoothcert.worker.queue.result_sweep`), in a thread of its own.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import TimeLimitExceeded
from celery.signals import (
    task_failure,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)

from smoothcert.service.core.jobs import JobStore
from smoothcert.service.core.queue import send_first, soft_time_limit_s, watchdog_time_limit_s
from smoothcert.service.core.redis_client import confirm_replicated
from smoothcert.service.core.settings import Settings
from smoothcert.service.core.storage_quota import sweep_orphan_inputs
from smoothcert.service.core.workers import HEARTBEAT_PREFIX, PROCESSES_PREFIX
from smoothcert.worker.queue import context, outage, watchdog
from smoothcert.worker.queue.leases import Lease, Leases
from smoothcert.worker.queue.result_sweep import ResultSweep

log = logging.getLogger(__name__)

# Set in the main process before the pool forks, so every pool process shares them: the worker's
# name and its incarnation (a random id per start; a restarted container keeps its hostname).
_state: dict[str, Any] = {"name": None, "incarnation": uuid.uuid4().hex[:16]}


def _settings() -> Settings:
    return context.current().settings


def _client() -> redis.Redis:
    """This process's Redis client (the worker context's; a forked child makes its own)."""
    return context.current().redis()


def _leases() -> Leases:
    return Leases(_client(), HEARTBEAT_PREFIX, _settings().worker_heartbeat_ttl_s)


def worker_name() -> str:
    return _state["name"] or f"{socket.gethostname()}.{os.getpid()}"


def _jobs() -> JobStore:
    return context.current().jobs


def retire_process(reason: str) -> None:
    """Have this pool process exit once its task has released its lease (a model left running in
    one of its threads, which nothing can stop). The prefork pool starts a fresh process; the
    task's message goes back to the queue and is dropped there, its job having ended."""
    _state["retire"] = reason


class LeasedTask(Task):
    """Every project task: holds a lease while it runs, under its process's watchdog, and writes
    its job under that lease (a worker whose task was taken over changes nothing any more);
    returns at once if a live worker holds the lease. A process that :func:`retire_process`
    marked exits after releasing the lease. A task's first argument is its job id."""

    def __call__(self, *args, **kwargs):
        if self.request.called_directly or not self.request.id:
            return super().__call__(*args, **kwargs)
        # Redis lost under the task's own bookkeeping (its lease, the job's start): a restart, or
        # a Sentinel failover, whose promotion also closes every connection to the promoted
        # replica. The task runs again here once Redis answers, as a redelivery would (the job's
        # records make that safe), rather than failing with a message that its broker connection,
        # gone too, can neither acknowledge nor give back before the visibility timeout.
        deadline = time.monotonic() + outage.OUTCOME_RETRY_S
        while True:
            try:
                return self._leased(*args, **kwargs)
            except outage.OUTAGE as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                job_id = str(args[0]) if args else None
                log.warning(
                    "Redis went away under task %s (%s: %s); it runs again once Redis answers",
                    self.request.id,
                    type(exc).__name__,
                    exc,
                    extra={"job_id": job_id},
                )
                outage.persist(
                    lambda: _client().ping(),
                    "waiting for Redis to run the task again",
                    job_id,
                    left,
                )

    def _leased(self, *args, **kwargs):
        leases = _leases()
        lease = leases.claim(
            self.request.id,
            self.request.hostname or worker_name(),
            _state["incarnation"],
            os.getpid(),
            self.name,
            list(args),
        )
        if lease is None:
            log.info(
                "task %s runs on another live worker; this copy of its message is dropped",
                self.request.id,
            )
            return None
        job_id = str(args[0]) if args else None
        ctx = context.current()
        ctx.fence = lease.fence()
        limit = _settings().task_time_limit_s
        watch = watchdog.begin(
            self.request.id,
            job_id,
            limit_s=limit,
            end_after_s=watchdog_time_limit_s(limit),
            floor_s=_settings().batch_deadline_floor_s,
            factor=_settings().batch_deadline_factor,
            release=lambda: leases.release(lease),
            fail=lambda message: job_id and _jobs().fail(job_id, message),
            report=lambda batch: report_process(batch=batch),
        )
        try:
            return super().__call__(*args, **kwargs)
        finally:
            watchdog.end(watch)
            ctx.fence = None
            try:
                outage.persist(
                    lambda: leases.release(lease),
                    f"releasing the lease of task {self.request.id}",
                    job_id,
                )
            except redis.RedisError:
                log.warning("could not release the lease of task %s", self.request.id)
            # With Sentinel: the job's outcome and the lease's release are on a replica before
            # Celery acknowledges the message, so a failover now cannot lose them.
            outage.tolerant(
                lambda: confirm_replicated(_client(), _settings()),
                0,
                "waiting for a replica to hold the task's writes",
                job_id,
            )
            if _state.get("retire"):
                log.error("worker process %d exits: %s", os.getpid(), _state["retire"])
                logging.shutdown()
                os._exit(70)


def report_process(
    device: str | None = None,
    model: dict[str, Any] | None = None,
    batch: Any = ...,
    ctx: context.WorkerContext | None = None,
) -> None:
    """Record this pool process's device, a model it loaded, or the slow batch it runs (``batch``:
    job_id, since, limit_s; None when it ended), for ``/readyz`` (best effort), in the Redis of
    ``ctx`` (the process's context unless given)."""
    ctx = ctx or context.current()
    key, field = PROCESSES_PREFIX + worker_name(), str(os.getpid())
    try:
        client = ctx.redis()
        raw = client.hget(key, field)
        entry = json.loads(raw) if raw else {"pid": os.getpid(), "device": None, "models": []}
        if device is not None:
            entry["device"] = device
        if model is not None:
            entry["models"] = [m for m in entry["models"] if m.get("id") != model.get("id")][
                -7:
            ] + [model]
        if batch is not ...:
            entry["batch"] = batch
        entry["updated_at"] = round(time.time(), 3)
        client.hset(key, field, json.dumps(entry))
        client.expire(key, ctx.settings.worker_heartbeat_ttl_s * 6)
    except redis.RedisError:
        pass


class Heartbeat:
    """The main process's heartbeat thread; it also prunes gone pool processes, reaps leases and
    sweeps away orphaned job inputs."""

    def __init__(self, app: Celery, name: str, queues: list[str], concurrency: int):
        self.app, self.name = app, name
        self.ttl_s = _settings().worker_heartbeat_ttl_s
        self.record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "incarnation": _state["incarnation"],
            "started_at": round(time.time(), 3),
            "queues": queues,
            "concurrency": concurrency,
            "requested_device": _settings().device,
            "heartbeat_ttl_s": self.ttl_s,
        }
        self.stop_event = threading.Event()

    def beat(self, client: redis.Redis, leases: Leases) -> None:
        client.set(HEARTBEAT_PREFIX + self.name, json.dumps(self.record), ex=self.ttl_s)
        procs_key = PROCESSES_PREFIX + self.name
        for pid in client.hkeys(procs_key):
            if not _process_exists(int(pid)):
                client.hdel(procs_key, pid)
        client.expire(procs_key, self.ttl_s * 6)
        for lease in leases.reap(self.resend, skip_incarnation=_state["incarnation"]):
            log.warning(
                "worker %s stopped beating; task %s (%s) was sent again",
                lease.worker,
                lease.task_id,
                lease.task,
            )
        settings = _settings()
        sweep_orphan_inputs(
            client,
            settings.jobs_dir,
            grace_s=settings.orphan_inputs_grace_s,
            job_ttl_s=settings.job_ttl_s,
        )

    def resend(self, lease: Lease) -> None:
        """Send a dead worker's task again, to the front of its queue: it was first in line once
        already, so it runs next rather than behind everything queued since."""
        send_first(self.app, lease.task, lease.args, lease.task_id)

    def run(self) -> None:
        client = context.current().connect(connect_timeout_s=2, timeout_s=5)
        leases = Leases(client, HEARTBEAT_PREFIX, self.ttl_s)
        while not self.stop_event.is_set():
            try:
                self.beat(client, leases)
            except redis.RedisError:
                pass  # Redis is down; the worker itself reconnects, readyz says not ready
            except Exception:  # never let a bug stop the heartbeat
                log.exception("heartbeat failed")
            self.stop_event.wait(self.ttl_s / 5)
        try:
            client.delete(HEARTBEAT_PREFIX + self.name, PROCESSES_PREFIX + self.name)
        except redis.RedisError:
            pass


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_heartbeat: dict[str, Heartbeat] = {}
_sweep: dict[str, ResultSweep] = {}


def install(app: Celery) -> None:
    """Connect the signal handlers that start and stop the heartbeat of a worker of ``app``."""

    @worker_init.connect(weak=False)
    def _name(sender=None, **_):
        _state["name"] = getattr(sender, "hostname", None)
        _state["incarnation"] = uuid.uuid4().hex[:16]

    @worker_process_init.connect(weak=False)
    def _pool_process(**_):
        from smoothcert.models.loaders import resolve_device  # torch: pool processes only

        report_process(device=str(resolve_device(_settings().device)))

    @worker_ready.connect(weak=False)
    def _start(sender=None, **_):
        _state["name"] = getattr(sender, "hostname", None) or _state["name"]
        queues = sorted(
            q.name for q in getattr(getattr(sender, "task_consumer", None), "queues", []) or []
        )
        concurrency = (
            getattr(getattr(sender, "pool", None), "limit", None) or _settings().worker_concurrency
        )
        beat = Heartbeat(app, worker_name(), queues, int(concurrency))
        _heartbeat["current"] = beat
        threading.Thread(target=beat.run, name="smoothcert-heartbeat", daemon=True).start()
        _sweep["current"] = ResultSweep().start()

    @task_failure.connect(weak=False)
    def _hard_time_limit(task_id=None, exception=None, args=None, **_):
        """Celery's hard limit killed a task's process (in the main process, where Celery handles
        it): the job fails saying so and the lease goes, rather than both staying as they were."""
        if not isinstance(exception, TimeLimitExceeded) or not task_id:
            return
        limit = _settings().task_time_limit_s
        try:
            if args:
                _jobs().fail(
                    str(args[0]),
                    f"the job exceeded the {limit:g} s time limit "
                    "(SMOOTHCERT_TASK_TIME_LIMIT_S); its worker process was killed",
                )
            leases = _leases()
            lease = leases.get(task_id)
            # Only the killed run's lease, as old as the limit: the message's next delivery (after
            # the watchdog ended that run) may hold a young one.
            if (
                lease is not None
                and lease.incarnation == _state["incarnation"]
                and time.time() - lease.since >= soft_time_limit_s(limit)
            ):
                leases.release(lease)
        except redis.RedisError:
            log.warning("could not record the hard time limit of task %s", task_id)

    @worker_shutdown.connect(weak=False)
    def _stop(**_):
        for beat in _heartbeat.values():
            beat.stop_event.set()
        for sweep in _sweep.values():
            sweep.stop_event.set()
