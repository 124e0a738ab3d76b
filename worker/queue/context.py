"""The worker's composition root: its settings, Redis, stores and caches, in one object.

A worker process builds one :class:`WorkerContext` at start-up (:func:`start`, called by
:mod:`smoothcert.worker.queue.celery_app`) and every part of the queue side takes what it needs
from it: the tasks hand it to the runner's plain functions, liveness and the watchdog's callbacks
read it through :func:`current`. Nothing else in ``worker/queue`` reads the environment, opens a
Redis connection or keeps a cache of its own, so a test builds a context on a real Redis and a
temporary data dir and calls the runner, the message checks or liveness directly, without Celery.

Redis connections are per process: a forked pool process must not share its parent's sockets, so
:meth:`WorkerContext.redis` makes one client per pid, on first use after the fork. The model cache
lives in each pool process (the main process loads no model).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import redis

from smoothcert.service.core.dataset_store import DatasetStore
from smoothcert.service.core.job_chunks import ChunkLedger
from smoothcert.service.core.jobs import Fence, JobStore
from smoothcert.service.core.model_store import ModelStore
from smoothcert.service.core.redis_client import connect
from smoothcert.service.core.results import ResultFiles
from smoothcert.service.core.settings import Settings

MODEL_CACHE_SIZE = 4
"""How many loaded models (and as many models in a chosen runtime) a pool process keeps."""


class LruCache:
    """The last ``size`` values built by :meth:`get`, by key; the least recently used goes first."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], Any]) -> tuple[Any, bool]:
        """The value kept under ``key``, else ``build()``'s, kept; and whether it was built now."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key], False
        while len(self._items) >= self.size:
            self._items.popitem(last=False)
        self._items[key] = value = build()
        return value, True

    def __len__(self) -> int:
        return len(self._items)


class WorkerContext:
    """Everything a worker's tasks use, built once from ``settings``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.models = ModelStore(settings.models_dir)
        self.datasets = DatasetStore(settings.datasets_dir)
        self.results = ResultFiles(settings.results_dir, settings.samples_ttl_s)
        self.loaded_models = LruCache(MODEL_CACHE_SIZE)  # (id, sha256) -> loaded model
        # (id, sha256, runtime asked for, precision, batch size class) -> model in that runtime
        self.runtime_models = LruCache(MODEL_CACHE_SIZE)
        self._clients: dict[int, redis.Redis] = {}
        # The lease of the task this process runs (set by liveness.LeasedTask): every job store
        # it hands out writes under it, so a run whose task another worker took over changes
        # nothing any more (service/core/jobs.py, Fence).
        self.fence: Fence | None = None

    def connect(self, *, connect_timeout_s: float = 5, timeout_s: float = 30) -> redis.Redis:
        """A new Redis client of the service's Redis (the URL's server, or the primary the
        sentinels name: :mod:`smoothcert.service.core.redis_client`), for a thread that wants its
        own timeouts."""
        return connect(self.settings, connect_timeout_s=connect_timeout_s, timeout_s=timeout_s)

    def redis(self) -> redis.Redis:
        """This process's Redis client (one connection pool per pid, made after a fork)."""
        pid = os.getpid()
        if pid not in self._clients:
            self._clients[pid] = self.connect()
        return self._clients[pid]

    @property
    def jobs(self) -> JobStore:
        return JobStore(
            self.redis(), ttl_s=self.settings.job_ttl_s, files=self.results, fence=self.fence
        )

    @property
    def ledger(self) -> ChunkLedger:
        """The ledger of dataset jobs' chunks, on this process's connections."""
        return ChunkLedger(self.jobs)


_current: list[WorkerContext] = []


def start(settings: Settings | None = None) -> WorkerContext:
    """Build this process's context (from the environment's settings unless given) and make it
    the one :func:`current` returns; called once, when the worker's Celery app is built."""
    context = WorkerContext(settings if settings is not None else Settings())
    _current[:] = [context]
    return context


def current() -> WorkerContext:
    """The context :func:`start` built (built from the environment on first use otherwise)."""
    if not _current:
        start()
    return _current[0]
