"""The one place a Redis client is built from the settings: a plain server, or a Sentinel primary.

Every Redis client of the project comes from here: the API's (job store, limits, idempotency,
keys, datasets), the worker's (leases, heartbeats, job outcomes) and Celery's broker
(:func:`celery_broker`, which :mod:`smoothcert.service.core.queue` applies).

* ``SMOOTHCERT_REDIS_URL`` (or the default local one): a client of that one server.
* ``SMOOTHCERT_REDIS_SENTINELS`` (host:port,...): a client of the primary that the sentinels name
  for ``SMOOTHCERT_REDIS_MASTER_NAME`` (redis-py's :class:`redis.sentinel.Sentinel`). Each new
  connection asks the sentinels where the primary is, so after a failover the next connection
  reaches the promoted replica; calls made meanwhile fail with ``redis.ConnectionError``, which
  the API answers with 503 and ``Retry-After`` and a worker's task rides out
  (:mod:`smoothcert.worker.queue.outage`). Celery's broker gets kombu's ``sentinel://`` URLs with
  the master name and the sentinels' password in its transport options.

Replication is asynchronous: a write the primary has taken reaches the replica a moment later, and
a failover in that moment loses it. :func:`confirm_replicated` closes that window for the writes
that are acknowledged to someone (the API's 2xx to a change, a worker's task before its message is
acknowledged): it waits (``WAIT``) until ``SMOOTHCERT_REDIS_WAIT_REPLICAS`` replicas (at most those
the primary has connected) hold everything written so far, and raises :class:`NotReplicated`
(a ``redis.TimeoutError``) when they do not within ``SMOOTHCERT_REDIS_WAIT_TIMEOUT_MS``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import redis
from redis.sentinel import Sentinel

from smoothcert.service.core.settings import Settings

BARRIER_KEY = "smoothcert:replication-barrier"
"""The key :func:`confirm_replicated` increments: WAIT counts from a connection's last write."""


class NotReplicated(redis.exceptions.TimeoutError):
    """Fewer replicas than asked acknowledged the writes within the timeout."""


def uses_sentinel(settings: Settings) -> bool:
    return bool(settings.redis_sentinels)


def connect(
    settings: Settings,
    *,
    connect_timeout_s: float = 2,
    timeout_s: float = 10,
    health_check_interval: int = 0,
) -> redis.Redis:
    """A client of the service's Redis: the primary the sentinels name, or the one URL's server."""
    options: dict[str, Any] = dict(
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=timeout_s,
        health_check_interval=health_check_interval,
    )
    if not uses_sentinel(settings):
        return redis.Redis.from_url(settings.broker_url, **options)
    sentinel = Sentinel(
        settings.sentinels,
        sentinel_kwargs=_sentinel_kwargs(settings, connect_timeout_s),
        password=settings.redis_password or None,
        **options,
    )
    return sentinel.master_for(settings.redis_master_name, redis_class=redis.Redis, db=0)


def _sentinel_kwargs(settings: Settings, timeout_s: float) -> dict[str, Any]:
    """How a client talks to the sentinels themselves: short timeouts, their own password."""
    kwargs: dict[str, Any] = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s}
    if settings.redis_sentinel_password:
        kwargs["password"] = settings.redis_sentinel_password
    return kwargs


def celery_broker(settings: Settings) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and the transport options it needs beside the project's own: the plain
    URL and none, or kombu's ``sentinel://h:p;sentinel://h2:p2`` with the master's name and the
    sentinels' password (kombu takes the primary's password from the URL)."""
    if not uses_sentinel(settings):
        return settings.broker_url, {}
    auth = f":{quote(settings.redis_password, safe='')}@" if settings.redis_password else ""
    url = ";".join(f"sentinel://{auth}{_netloc(host, port)}/0" for host, port in settings.sentinels)
    return url, {
        "master_name": settings.redis_master_name,
        "sentinel_kwargs": _sentinel_kwargs(settings, 2),
    }


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def confirm_replicated(client: redis.Redis, settings: Settings) -> int:
    """Wait until the replicas hold every write made so far on the primary; how many confirmed.

    One connection: a write to :data:`BARRIER_KEY` (WAIT counts from the connection's last write,
    and the replication stream is one sequence, so it covers every earlier write of every
    client), ``ROLE`` (how many replicas are connected), then ``WAIT`` for
    min(``redis_wait_replicas``, connected) of them. Without sentinels, or with
    ``redis_wait_replicas`` 0, nothing is done (0). :class:`NotReplicated` when fewer confirm
    within ``redis_wait_timeout_ms``; other ``redis.RedisError`` as Redis raises them.
    """
    if not uses_sentinel(settings) or settings.redis_wait_replicas == 0:
        return 0
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        connection.send_command("INCR", BARRIER_KEY)
        connection.read_response()
        connection.send_command("ROLE")
        role = connection.read_response()
        connected = len(role[2]) if _text(role[0]) == "master" else 0
        wanted = min(settings.redis_wait_replicas, connected)
        if wanted == 0:
            return 0
        connection.send_command("WAIT", wanted, settings.redis_wait_timeout_ms)
        confirmed = int(connection.read_response())
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)
    if confirmed < wanted:
        raise NotReplicated(
            f"{confirmed} of {wanted} Redis replicas confirmed the write within "
            f"{settings.redis_wait_timeout_ms} ms (SMOOTHCERT_REDIS_WAIT_TIMEOUT_MS)"
        )
    return confirmed


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
