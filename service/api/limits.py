"""Backpressure on submissions: a per-account rate limit, a bound on each queue, and Idempotency-Key.

Every API replica shares them through Redis. A submission (``POST /v1/certify``, ``/v1/train``,
``/v1/datasets``) passes :meth:`Admission.submit` before anything is parsed into a job or
written, in this order:

1. ``Idempotency-Key`` (:mod:`smoothcert.service.api.idempotency`): a repeat of a finished request is
   answered from its record (same status, body and ``Location``); one still in progress is 409
   with ``Retry-After``; the key reused with another request is 422. None of these count below.
2. Rate limit: GCRA in one Lua script on ``smoothcert:ratelimit:<caller>`` (the theoretical
   arrival time in ms, Redis' clock), ``SMOOTHCERT_RATE_LIMIT_PER_MINUTE`` per key with bursts
   of as many. Every other attempt counts, whether it is then accepted or refused (422, 503, ...).
   Beyond it: 429 with ``Retry-After`` = whole seconds until one more would pass; a 429 itself
   uses up nothing.
3. Queue bound: the messages waiting in the job's Celery queue (kombu keeps each queue as Redis
   lists named after it, one per priority step), not jobs: a dataset job's chunks are one message
   each, and a message is the unit of waiting work. At ``SMOOTHCERT_MAX_QUEUED_MESSAGES`` or more
   the submission is 503 with ``Retry-After``. Messages a worker has taken are not waiting and do
   not count. Once the job is parsed, :meth:`Limits.room` holds room for all of its messages
   before any is sent (one script: the waiting messages plus the rooms other submissions hold,
   ``smoothcert:queue-rooms:<queue>``), so a dataset job that would take the queue past the bound
   is refused whole with the same 503, and concurrent submissions on any number of replicas
   never take it past the bound either. A room lapses after ``ROOM_TTL_MS`` if its API dies.
4. Active jobs: a key may have ``SMOOTHCERT_MAX_ACTIVE_JOBS_PER_KEY`` jobs queued or running;
   beyond, 429 with ``Retry-After``. Checked here first, then atomically when the job record is
   created (:meth:`~smoothcert.service.core.jobs.JobStore.create`, which keeps the count from the
   records' states).

Dataset uploads and the inputs of certify jobs count against the key's storage quota,
``SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY``: :meth:`Limits.storage` reserves what an upload will
store once its headers are read, against the stored datasets recorded with the key plus what it
holds in ``smoothcert:storage:<caller>`` (its other uploads in progress, lapsing after
``STORAGE_TTL_MS``, and its jobs' inputs); beyond, 413. :meth:`Limits.reserve_inputs` does the
same for a job's ``inputs.npy`` before it is written; that reservation is given back when the
inputs are deleted (:mod:`smoothcert.service.core.storage_quota`, where the Redis side is, since
the workers give back too). A reservation
outlives its upload on purpose: another upload that listed the datasets just before this one was
recorded still counts it, and one that sees the dataset stored counts it there and skips the
reservation. Only its lapse or the dataset's deletion drops it: were a reservation dropped once
some upload saw its dataset stored, a third upload holding an older listing would count it
nowhere.

``<caller>`` is the caller's account name, never a key: two keys of one account share its
limits. Model uploads are not limited: they
need the admin key and each one waits for a worker to check the model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import redis
from fastapi import HTTPException, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from smoothcert.service.api.idempotency import (
    PENDING_RETRY_AFTER_S,
    IdempotencyStore,
    Remembered,
    fingerprint,
)
from smoothcert.service.core.dataset_store import Admit, DatasetStore
from smoothcert.service.core.jobs import ActiveJobsExceeded, active_jobs
from smoothcert.service.core.model_store import ModelStore
from smoothcert.service.core.queue import queue_depth, queue_names  # noqa: F401  (tests read queue_depth here)
from smoothcert.service.core.settings import Settings
from smoothcert.service.core.storage_quota import LAPSE_LUA as _LAPSE
from smoothcert.service.core.storage_quota import STORAGE_LUA as _STORAGE
from smoothcert.service.core.storage_quota import (
    STORAGE_PREFIX,  # noqa: F401  (tests read it here)
    JobInputs,
    inputs_ttl_ms,
)
from smoothcert.service.core.storage_quota import held as _held
from smoothcert.service.core.store import ADMIN_ACCOUNT

log = logging.getLogger("smoothcert.service")
RATE_PREFIX = "smoothcert:ratelimit:"
QUEUE_FULL_RETRY_AFTER_S = 10  # a hint: the queue drains at whatever pace the workers have
ACTIVE_RETRY_AFTER_S = 10  # a hint too: a slot frees when one of the key's jobs finishes
ROOMS_PREFIX = "smoothcert:queue-rooms:"
ROOM_TTL_MS = 120_000  # far longer than sending one job's messages takes
STORAGE_TTL_MS = 600_000  # longer than writing the largest dataset takes
UNBOUNDED = 2**53  # a quota nothing reaches (exact in the Lua scripts' doubles)

# KEYS[1], KEYS[2] the queue's rooms (as in _LAPSE), KEYS[3..] the queue's lists; ARGV[1] token
# ('' only checks), ARGV[2] messages, ARGV[3] bound, ARGV[4] ttl ms. Returns {1 when there is room
# (and it is held), the messages waiting plus those held}.
_ROOM = (
    _LAPSE
    + """
local depth = held
for i = 3, #KEYS do depth = depth + redis.call('LLEN', KEYS[i]) end
if depth + tonumber(ARGV[2]) > tonumber(ARGV[3]) then return {0, depth} end
if ARGV[1] ~= '' then hold(ARGV[1], ARGV[2], tonumber(ARGV[4])) end
return {1, depth}
"""
)

# KEYS[1] the caller's theoretical arrival time (TAT, ms); ARGV[1] ms per submission; ARGV[2] burst.
# Admits when the TAT after this submission is at most burst intervals ahead of now; returns 0
# then, else the ms to wait until it would be.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now) + interval
local wait = tat - now - interval * tonumber(ARGV[2])
if wait > 0 then return math.ceil(wait) end
redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now))
return 0
"""


def _refusal(code: int, detail: str, retry_after_s: int) -> HTTPException:
    return HTTPException(code, detail, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class Limits:
    """One app's rate limiter, queue bound and idempotency store (its Redis client, its settings)."""

    def __init__(self, client: redis.Redis, settings: Settings, models: ModelStore | None = None):
        self.redis, self.settings, self.models = client, settings, models
        self.idempotency = IdempotencyStore(client, settings.idempotency_ttl_s)
        self._gcra = client.register_script(_GCRA)
        self._room = client.register_script(_ROOM)
        self._storage = client.register_script(_STORAGE)

    def take(self, caller: str) -> None:
        """Count one submission of ``caller``; 429 with Retry-After when over the rate."""
        per_minute = self.settings.rate_limit_per_minute
        if per_minute <= 0:
            return
        wait_ms = int(
            self._gcra(keys=[RATE_PREFIX + caller], args=[60_000 / per_minute, per_minute])
        )
        if wait_ms > 0:
            raise _refusal(
                status.HTTP_429_TOO_MANY_REQUESTS,
                f"rate limit: at most {per_minute} submissions per minute per API key "
                "(SMOOTHCERT_RATE_LIMIT_PER_MINUTE); retry after Retry-After seconds",
                math.ceil(wait_ms / 1000),
            )

    def check_room(self, queue: str) -> None:
        """503 with Retry-After when ``queue`` already holds the bound (rooms held included)."""
        self._take_room(queue, "", 1)

    @contextlib.contextmanager
    def room(self, queue: str, messages: int) -> Iterator[None]:
        """Hold room for ``messages`` more in ``queue`` while the block sends them; 503 with
        Retry-After, before the block runs, when they would take it past the bound. The room is
        given back when the block ends (its messages then wait in the queue, or were never sent)."""
        token = uuid.uuid4().hex
        self._take_room(queue, token, messages)
        try:
            yield
        finally:
            with contextlib.suppress(redis.RedisError):  # else it lapses after ROOM_TTL_MS
                self._give_back(_held(ROOMS_PREFIX + queue), token)

    def _take_room(self, queue: str, token: str, messages: int) -> None:
        cap = self.settings.max_queued_messages
        keys = [*_held(ROOMS_PREFIX + queue), *queue_names(queue)]
        ok, depth = self._room(keys=keys, args=[token, messages, cap, ROOM_TTL_MS])
        if not ok:
            needs = f"; this dataset job needs {messages}, one per chunk" if messages > 1 else ""
            raise _refusal(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"the {queue!r} queue is full: {depth} messages wait, the bound is {cap} "
                f"(SMOOTHCERT_MAX_QUEUED_MESSAGES){needs}; retry after Retry-After seconds",
                QUEUE_FULL_RETRY_AFTER_S,
            )

    def _give_back(self, keys: list[str], token: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.zrem(keys[0], token)
            pipe.hdel(keys[1], token)
            pipe.execute()

    def check_active(self, caller: str) -> None:
        """429 with Retry-After when ``caller`` already has its quota of queued and running jobs."""
        quota = self.settings.max_active_jobs_per_key
        active = active_jobs(self.redis, caller)
        if active >= quota:
            raise self.too_many_active(active, quota)

    @staticmethod
    def too_many_active(active: int, quota: int) -> HTTPException:
        return _refusal(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"this account has {active} jobs queued or running, its quota is {quota} "
            "(SMOOTHCERT_MAX_ACTIVE_JOBS_PER_KEY); retry after Retry-After seconds, once one of "
            "them has finished (or cancel one: DELETE /v1/jobs/{id})",
            ACTIVE_RETRY_AFTER_S,
        )

    def storage(self, caller: str, datasets: DatasetStore) -> Admit:
        """The ``admit`` of :meth:`DatasetStore.add` for ``caller``'s upload: 413 when what it will
        store takes the caller past its storage quota; otherwise the bytes stay reserved until the
        dataset is stored (or, given back at once, until the upload fails)."""
        quota, keys = self._storage_quota(caller), _held(STORAGE_PREFIX + caller)

        @contextlib.contextmanager
        def admit(dataset_id: str, stored_bytes: int) -> Iterator[None]:
            stored, ids = self._stored(caller, datasets)
            ok, used = self._storage(
                keys=keys, args=[dataset_id, stored_bytes, quota, stored, STORAGE_TTL_MS, *ids]
            )
            if not ok:
                raise HTTPException(
                    status.HTTP_413_CONTENT_TOO_LARGE,
                    f"storage quota: this dataset would take {stored_bytes} bytes stored, and "
                    f"this API key already uses {used} of its {quota} bytes "
                    "(SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY: its datasets, models, the inputs of "
                    "its queued and running jobs and its stored certificates); delete datasets or "
                    "certificates it no longer needs (DELETE /v1/datasets/{id}, DELETE "
                    "/v1/certificates/{sha256}), wait for its jobs to end, or upload a smaller one",
                )
            try:
                yield
            except BaseException:
                with contextlib.suppress(redis.RedisError):  # else it lapses after STORAGE_TTL_MS
                    self._give_back(keys, dataset_id)
                raise
            # Stored: the reservation stays until it lapses or forget_storage drops it on delete.

        return admit

    def reserve_inputs(
        self, caller: str, datasets: DatasetStore, job_id: str, stored_bytes: int
    ) -> None:
        """Count ``stored_bytes`` of job ``job_id``'s inputs against ``caller``'s storage quota
        until they are deleted (:mod:`smoothcert.service.core.storage_quota`); 413 when they do
        not fit beside its datasets, the inputs of its other jobs and its certificates."""
        quota, settings = self._storage_quota(caller), self.settings
        stored, ids = self._stored(caller, datasets)
        ok, used = JobInputs(self.redis).reserve(
            caller,
            job_id,
            stored_bytes,
            quota=quota,
            stored=stored,
            dataset_ids=ids,
            ttl_ms=inputs_ttl_ms(settings.job_ttl_s, settings.orphan_inputs_grace_s),
        )
        if not ok:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE,
                f"storage quota: this job's inputs would take {stored_bytes} bytes stored until "
                f"it ends, and this API key already uses {used} of its {quota} bytes "
                "(SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY: its datasets, models, the inputs of its "
                "queued and running jobs and its stored certificates); wait for its jobs to end, "
                "cancel one (DELETE /v1/jobs/{id}), delete datasets or certificates it no longer "
                "needs, or send fewer inputs",
            )

    def _storage_quota(self, caller: str) -> int:
        """``caller``'s storage quota: ``SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY``, except for the
        admin account, the operator's own (the demo model, models it uploads for everyone), which
        it does not bound. Its use is still counted, as every account's is."""
        return UNBOUNDED if caller == ADMIN_ACCOUNT else self.settings.max_storage_bytes_per_key

    def _stored(self, caller: str, datasets: DatasetStore) -> tuple[int, list[str]]:
        """What ``caller``'s stored datasets and models take on disk, and their ids (whose upload
        reservations the storage scripts then leave out, so nothing counts twice)."""
        stored, ids = datasets.stored_bytes(caller)
        if self.models is not None:
            model_bytes, model_ids = self.models.stored_bytes(caller)
            stored, ids = stored + model_bytes, [*ids, *model_ids]
        return stored, ids

    def admit_model(self, caller: str, datasets: DatasetStore, model_id: str) -> None:
        """Count model ``model_id``, just stored (pending its check), against ``caller``'s storage
        quota; 413 when it takes the caller past it (the caller then deletes the model). Its
        reservation covers it while concurrent uploads count; once stored it counts from disk."""
        assert self.models is not None, "model uploads need the app's model store"
        quota = self._storage_quota(caller)
        nbytes = self.models.disk_bytes(model_id)
        stored, ids = self._stored(caller, datasets)
        ok, used = self._storage(
            keys=_held(STORAGE_PREFIX + caller),
            # its own bytes are in ``stored`` already (it is on disk): counted once, as the upload
            args=[model_id, nbytes, quota, stored - nbytes, STORAGE_TTL_MS, *ids],
        )
        if not ok:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE,
                f"storage quota: this model takes {nbytes} bytes stored, and this API key already "
                f"uses {used} of its {quota} bytes (SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY: its "
                "datasets, models, the inputs of its queued and running jobs and its stored "
                "certificates); delete models or datasets it no longer needs (DELETE "
                "/v1/models/{id}, DELETE /v1/datasets/{id})",
            )

    def forget_storage(self, owner: str, dataset_id: str) -> None:
        """Drop what is still reserved for a dataset (or model) of ``owner`` that was just
        deleted."""
        with contextlib.suppress(redis.RedisError):  # the delete happened; the reservation lapses
            self._give_back(_held(STORAGE_PREFIX + owner), dataset_id)


class Admission:
    """One submission's pass through the limits (module docstring); sync, so call it in a thread."""

    def __init__(self, limits: Limits, caller: str, route: str, idempotency_key: str | None):
        self.limits, self.caller, self.route = limits, caller, route
        self.key = (
            None if idempotency_key is None else limits.idempotency.key(caller, idempotency_key)
        )

    @property
    def max_active(self) -> int:
        """The caller's quota of queued and running jobs, for JobStore.create."""
        return self.limits.settings.max_active_jobs_per_key

    def room(self, queue: str, messages: int) -> contextlib.AbstractContextManager[None]:
        """Limits.room: hold room for the job's ``messages`` while they are sent."""
        return self.limits.room(queue, messages)

    def storage(self, datasets: DatasetStore) -> Admit:
        """Limits.storage for the caller."""
        return self.limits.storage(self.caller, datasets)

    def reserve_inputs(self, datasets: DatasetStore, job_id: str, stored_bytes: int) -> None:
        """Limits.reserve_inputs for the caller: 413 when the job's inputs do not fit its quota."""
        self.limits.reserve_inputs(self.caller, datasets, job_id, stored_bytes)

    def submit(
        self,
        content: Callable[[], Any],
        create: Callable[[], tuple[BaseModel, str]],
        *,
        status_code: int,
        queue: str | None,
    ) -> JSONResponse:
        """The answer to the submission: ``create()`` (the record and its ``Location``) runs only
        once the limits let it; ``content()`` is the request in normal form (for the fingerprint)."""
        store, key, token, digest = self.limits.idempotency, self.key, None, ""
        if key is not None:
            digest = fingerprint(self.route, content())
            token, other = store.reserve(key, digest)
            if other is not None:
                return self._answer_repeat(other, digest)
        try:
            self.limits.take(self.caller)
            if queue is not None:
                self.limits.check_room(queue)
                self.limits.check_active(self.caller)
            try:
                record, location = create()
            except ActiveJobsExceeded as exc:  # a concurrent submission took the last slot
                raise self.limits.too_many_active(exc.active, exc.quota) from None
        except BaseException:
            if key is not None and token is not None:
                with contextlib.suppress(redis.RedisError):  # else it expires after PENDING_TTL_S
                    store.release(key, token)
            raise
        answer = {
            "status_code": status_code,
            "body": record.model_dump(mode="json"),
            "location": location,
        }
        if key is not None and token is not None:
            try:
                store.remember(key, token, digest, answer)
            except redis.RedisError as exc:  # the job exists: answer 202 all the same
                log.warning("could not remember Idempotency-Key answer %s: %s", location, exc)
        return _response(answer)

    def _answer_repeat(self, other: Remembered, digest: str) -> JSONResponse:
        if other.fingerprint != digest:
            raise HTTPException(
                422,
                "this Idempotency-Key was already used with a different request (another "
                "body or route); send a new key for a new request",
            )
        if other.answer is None:
            raise _refusal(
                status.HTTP_409_CONFLICT,
                "a request with this Idempotency-Key is still in progress; "
                "retry after Retry-After seconds",
                PENDING_RETRY_AFTER_S,
            )
        return _response(other.answer, replayed=True)


def _response(answer: dict[str, Any], replayed: bool = False) -> JSONResponse:
    headers = {"Location": answer["location"]}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(answer["body"], status_code=answer["status_code"], headers=headers)


# --- OpenAPI: the answers above, with their Retry-After header ----------------------------------

_ERROR_BODY = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["detail"],
            "properties": {"detail": {"type": "string"}},
        }
    }
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "whole seconds to wait before sending the request again",
        "schema": {"type": "integer", "minimum": 1},
    }
}


# A route's documented answers by status code, as FastAPI's ``responses=`` takes them.
Responses = dict[int | str, dict[str, Any]]


def _documented(description: str) -> dict[str, Any]:
    return {"description": description, "headers": _RETRY_AFTER, "content": _ERROR_BODY}


IN_PROGRESS: Responses = {
    409: _documented("a request with the same Idempotency-Key is still in progress")
}
RATE_LIMITED: Responses = {
    429: _documented("over this API key's rate limit (SMOOTHCERT_RATE_LIMIT_PER_MINUTE)")
}
JOBS_LIMITED: Responses = {
    429: _documented(
        "over this API key's rate limit (SMOOTHCERT_RATE_LIMIT_PER_MINUTE), or it "
        "already has SMOOTHCERT_MAX_ACTIVE_JOBS_PER_KEY jobs queued or running"
    )
}
QUEUE_FULL: Responses = {
    503: _documented(
        "the job's queue holds SMOOTHCERT_MAX_QUEUED_MESSAGES messages; also 503 "
        "(with a shorter Retry-After) when Redis is unreachable or failing over"
    )
}
REUSED_KEY = "; or the Idempotency-Key was already used with a different request"
