"""Backpressure on submissions: a per-key rate limit, a bound on each queue, and Idempotency-Key.

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
   the submission is 503 with ``Retry-After``; below it, it is accepted whole (so a dataset job may
   take a queue past the bound by its chunks, and replicas that check at the same instant by one
   job each). Messages a worker has taken are not waiting and do not count.

``<caller>`` is a SHA-256 of the bearer key, never the key. Model uploads are not limited: they
need the admin key and each one waits for a worker to check the model.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable
from typing import Any

import redis
from fastapi import HTTPException, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from smoothcert.service.api.idempotency import PENDING_RETRY_AFTER_S, IdempotencyStore, Remembered, fingerprint
from smoothcert.service.core.queue import queue_depth
from smoothcert.service.core.settings import Settings

log = logging.getLogger("smoothcert.service")
RATE_PREFIX = "smoothcert:ratelimit:"
QUEUE_FULL_RETRY_AFTER_S = 10   # a hint: the queue drains at whatever pace the workers have

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


def caller_id(api_key: str) -> str:
    """The name under which a bearer key's limits and idempotency records are kept."""
    return hashlib.sha256(b"smoothcert-caller:" + api_key.encode()).hexdigest()[:32]


def _refusal(code: int, detail: str, retry_after_s: int) -> HTTPException:
    return HTTPException(code, detail, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class Limits:
    """One app's rate limiter, queue bound and idempotency store (its Redis client, its settings)."""

    def __init__(self, client: redis.Redis, settings: Settings):
        self.redis, self.settings = client, settings
        self.idempotency = IdempotencyStore(client, settings.idempotency_ttl_s)
        self._gcra = client.register_script(_GCRA)

    def take(self, caller: str) -> None:
        """Count one submission of ``caller``; 429 with Retry-After when over the rate."""
        per_minute = self.settings.rate_limit_per_minute
        if per_minute <= 0:
            return
        wait_ms = int(self._gcra(keys=[RATE_PREFIX + caller], args=[60_000 / per_minute, per_minute]))
        if wait_ms > 0:
            raise _refusal(status.HTTP_429_TOO_MANY_REQUESTS,
                           f"rate limit: at most {per_minute} submissions per minute per API key "
                           "(SMOOTHCERT_RATE_LIMIT_PER_MINUTE); retry after Retry-After seconds",
                           math.ceil(wait_ms / 1000))

    def check_room(self, queue: str) -> None:
        """503 with Retry-After when ``queue`` already holds the bound."""
        depth, cap = queue_depth(self.redis, queue), self.settings.max_queued_messages
        if depth >= cap:
            raise _refusal(status.HTTP_503_SERVICE_UNAVAILABLE,
                           f"the {queue!r} queue is full: {depth} messages wait, the bound is {cap} "
                           "(SMOOTHCERT_MAX_QUEUED_MESSAGES); retry after Retry-After seconds",
                           QUEUE_FULL_RETRY_AFTER_S)


class Admission:
    """One submission's pass through the limits (module docstring); sync, so call it in a thread."""

    def __init__(self, limits: Limits, caller: str, route: str, idempotency_key: str | None):
        self.limits, self.caller, self.route = limits, caller, route
        self.key = None if idempotency_key is None else limits.idempotency.key(caller, idempotency_key)

    def submit(self, content: Callable[[], Any], create: Callable[[], tuple[BaseModel, str]], *,
               status_code: int, queue: str | None) -> JSONResponse:
        """The answer to the submission: ``create()`` (the record and its ``Location``) runs only
        once the limits let it; ``content()`` is the request in normal form (for the fingerprint)."""
        store, token, digest = self.limits.idempotency, None, ""
        if self.key is not None:
            digest = fingerprint(self.route, content())
            token, other = store.reserve(self.key, digest)
            if other is not None:
                return self._answer_repeat(other, digest)
        try:
            self.limits.take(self.caller)
            if queue is not None:
                self.limits.check_room(queue)
            record, location = create()
        except BaseException:
            if token is not None:
                with contextlib.suppress(redis.RedisError):   # else it expires after PENDING_TTL_S
                    store.release(self.key, token)
            raise
        answer = {"status_code": status_code, "body": record.model_dump(mode="json"), "location": location}
        if token is not None:
            try:
                store.remember(self.key, token, digest, answer)
            except redis.RedisError as exc:   # the job exists: answer 202 all the same
                log.warning("could not remember Idempotency-Key answer %s: %s", location, exc)
        return _response(answer)

    def _answer_repeat(self, other: Remembered, digest: str) -> JSONResponse:
        if other.fingerprint != digest:
            raise HTTPException(422, "this Idempotency-Key was already used with a different request (another "
                                     "body or route); send a new key for a new request")
        if other.answer is None:
            raise _refusal(status.HTTP_409_CONFLICT, "a request with this Idempotency-Key is still in progress; "
                                                     "retry after Retry-After seconds", PENDING_RETRY_AFTER_S)
        return _response(other.answer, replayed=True)


def _response(answer: dict[str, Any], replayed: bool = False) -> JSONResponse:
    headers = {"Location": answer["location"]}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(answer["body"], status_code=answer["status_code"], headers=headers)


# --- OpenAPI: the answers above, with their Retry-After header ----------------------------------

_ERROR_BODY = {"application/json": {"schema": {
    "type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}}}}
_RETRY_AFTER = {"Retry-After": {"description": "whole seconds to wait before sending the request again",
                                "schema": {"type": "integer", "minimum": 1}}}


def _documented(description: str) -> dict[str, Any]:
    return {"description": description, "headers": _RETRY_AFTER, "content": _ERROR_BODY}


IN_PROGRESS = {409: _documented("a request with the same Idempotency-Key is still in progress")}
RATE_LIMITED = {429: _documented("over this API key's rate limit (SMOOTHCERT_RATE_LIMIT_PER_MINUTE)")}
QUEUE_FULL = {503: _documented("the job's queue holds SMOOTHCERT_MAX_QUEUED_MESSAGES messages; also 503 "
                               "(without Retry-After) when Redis is unreachable")}
REUSED_KEY = "; or the Idempotency-Key was already used with a different request"
