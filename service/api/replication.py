"""No change is acknowledged before a Redis replica holds it (with Sentinel).

With ``SMOOTHCERT_REDIS_SENTINELS`` the primary replicates asynchronously: a job record, a dataset
or model record, a queued message it has taken reaches the replica a moment later, and a failover
in that moment would lose what the client was already told exists. :class:`ReplicatedWrites`
holds back the status line of every successful answer (2xx) to a request that may change
something (POST, PUT, PATCH, DELETE) until
:func:`~smoothcert.service.core.redis_client.confirm_replicated` says the replicas hold every
write made so far (the request's own included: they were made before its answer). When they do
not confirm in time, or Redis is gone meanwhile, the answer becomes 503 with ``Retry-After``:
what the request wrote may or may not survive, and a client that retries with the same
``Idempotency-Key`` gets the first request's job rather than a second one. Without sentinels it
does nothing.
"""

from __future__ import annotations

import json
import logging

import redis
from anyio import to_thread

from smoothcert.service.core.redis_client import confirm_replicated, uses_sentinel
from smoothcert.service.core.settings import Settings

log = logging.getLogger("smoothcert.service")

CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
RETRY_AFTER_S = 5
"""The ``Retry-After`` of a 503 for Redis gone or failing over: about a Sentinel failover."""


class ReplicatedWrites:
    """ASGI middleware: a change's 2xx waits for the replicas (the module's docstring)."""

    def __init__(self, app, client: redis.Redis, settings: Settings):
        self.app, self.client, self.settings = app, client, settings

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] != "http"
            or scope.get("method") not in CHANGES
            or not uses_sentinel(self.settings)
            or self.settings.redis_wait_replicas == 0
        ):
            return await self.app(scope, receive, send)
        state = {"refused": False}

        async def confirmed(message):
            if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
                try:
                    await to_thread.run_sync(confirm_replicated, self.client, self.settings)
                except redis.RedisError as exc:
                    log.warning("a change was answered 503: %s", exc)
                    state["refused"] = True
                    await _unconfirmed(send, exc)
                    return
            if not state["refused"]:
                await send(message)

        await self.app(scope, receive, confirmed)


async def _unconfirmed(send, exc: redis.RedisError) -> None:
    body = json.dumps(
        {
            "detail": "the change could not be confirmed on a Redis replica, so it may not "
            f"survive a failover ({exc}); retry after Retry-After seconds, with the same "
            "Idempotency-Key to get the same job"
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(RETRY_AFTER_S).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
