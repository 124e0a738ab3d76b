"""The queue contract: task and queue names, the broker's reliability settings, queue lengths.

Both sides use it: the API builds a sending-only app with :func:`make_celery` and enqueues tasks
by name; a worker (:mod:`smoothcert.worker.queue.celery_app`) builds the same app with its task
modules and task class. Nothing here builds an app at import time, and nothing imports torch.

Training jobs are routed to their own queue, ``train``, so a long training run never holds up
certification: a worker consumes ``certify`` (the default), ``train``, or both. Reliability
settings (design §6): late acks with one prefetched message, so a task whose worker dies is
redelivered; the Redis visibility timeout exceeds the hard time limit, so a long task is never
handed out twice while it still runs. A task sent again for a dead worker (:func:`send_first`), and
the message of a task whose pool process died (:class:`WorkerTransport`, the transport a worker
consumes with), go to the front of their queue, ahead of every waiting message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery
from kombu.transport import virtual
from kombu.transport.redis import (
    PRIORITY_STEPS,
    Channel,
    QoS,
    SentinelChannel,
    SentinelTransport,
    Transport,
)
from kombu.utils.json import dumps

from smoothcert.service.core.redis_client import celery_broker
from smoothcert.service.core.settings import Settings

CERTIFY_TASK = "smoothcert.certify"
CERTIFY_CHUNK_TASK = "smoothcert.certify_chunk"
CHECK_MODEL_TASK = "smoothcert.check_model"
TRAIN_TASK = "smoothcert.train"
TRAIN_DENOISER_TASK = "smoothcert.train_denoiser"
QUEUE = "certify"
TRAIN_QUEUE = "train"
QUEUES = (QUEUE, TRAIN_QUEUE)


def soft_time_limit_s(limit_s: float) -> float:
    """Celery's soft limit for a hard limit of ``limit_s``: 30 s earlier, or a quarter earlier
    under 2 minutes (``SoftTimeLimitExceeded`` in the task: the job fails with a message)."""
    return limit_s - min(30.0, limit_s / 4)


def watchdog_time_limit_s(limit_s: float) -> float:
    """When a pool process's watchdog ends a task that is still running (one stuck in native code,
    where the soft limit's exception never arrives): 10 s before the hard limit, or an eighth
    before it under 80 s. Celery's hard limit, which kills the process, is the last resort."""
    return limit_s - min(10.0, limit_s / 8)


def celery_config(settings: Settings) -> dict:
    """The Celery settings every process of the service runs with (no result backend: results
    live in the job records)."""
    _, sentinel_options = celery_broker(settings)
    return dict(
        task_default_queue=QUEUE,
        task_routes={
            TRAIN_TASK: {"queue": TRAIN_QUEUE},
            TRAIN_DENOISER_TASK: {"queue": TRAIN_QUEUE},
        },
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in our job records
        task_acks_late=True,
        task_reject_on_worker_lost=True,  # a killed worker's task goes back to the queue
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=soft_time_limit_s(settings.task_time_limit_s),
        broker_transport_options={
            "visibility_timeout": settings.task_time_limit_s + 600,
            **sentinel_options,  # master_name and the sentinels' password, with sentinels
        },
        broker_connection_retry_on_startup=True,
        # The API must answer 503 quickly when Redis is gone, not retry for seconds.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )


def make_celery(
    settings: Settings, *, include: Sequence[str] = (), task_cls: str | None = None
) -> Celery:
    """A Celery app on the service's Redis (:func:`~smoothcert.service.core.redis_client.celery_broker`:
    the URL's server or the sentinels' primary); a worker passes its task modules and task class."""
    options = {"task_cls": task_cls} if task_cls else {}
    app = Celery(
        "smoothcert",
        broker=celery_broker(settings)[0],
        set_as_default=False,
        include=list(include),
        **options,
    )
    app.conf.update(celery_config(settings))
    return app


def queue_names(queue: str) -> list[str]:
    """The Redis lists kombu keeps ``queue``'s messages in, one per priority step."""
    return [f"{queue}{Channel.sep}{step}" if step else queue for step in PRIORITY_STEPS]


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in ``queue`` (taken but unacknowledged ones are not waiting)."""
    with client.pipeline(transaction=False) as pipe:
        for name in queue_names(queue):
            pipe.llen(name)
        return sum(pipe.execute())


class _FrontChannel(Channel):
    """Kombu's Redis channel, except that it puts a message where the next consumer takes it from.

    Kombu keeps a queue as one Redis list per priority step (:func:`queue_names`), LPUSHes each
    new message onto its step's list, and consumers BRPOP the lists, step 0 first: the right end
    of the step-0 list is what comes out next, whatever the lists hold.
    """

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        with self.conn_or_acquire() as client:
            client.rpush(self._q_for_pri(queue, PRIORITY_STEPS[0]), dumps(message))


class _FrontSentinelChannel(_FrontChannel, SentinelChannel):
    pass


class _FrontTransport(Transport):
    Channel = _FrontChannel


class _FrontSentinelTransport(SentinelTransport):
    Channel = _FrontSentinelChannel


class _FrontRequeueQoS(QoS):
    """Kombu's Redis QoS, except that a message rejected for requeueing goes back to the front of
    its queue (kombu puts it at the back). Celery rejects that way the message of a task whose
    pool process died under it (``task_reject_on_worker_lost``: killed, out of memory, retired by
    its watchdog); it was first in line once already, so it runs before any backlog."""

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if not requeue:
            return super().reject(delivery_tag, requeue)
        self.restore_by_tag(delivery_tag, leftmost=False)  # RPUSH: the end consumers BRPOP from
        virtual.QoS.ack(self, delivery_tag)


class _WorkerChannel(Channel):
    QoS = _FrontRequeueQoS


class WorkerTransport(Transport):
    """The transport a worker consumes with: kombu's Redis transport with :class:`_FrontRequeueQoS`."""

    Channel = _WorkerChannel


class _WorkerSentinelChannel(_WorkerChannel, SentinelChannel):
    pass


class WorkerSentinelTransport(SentinelTransport):
    """:class:`WorkerTransport` on the primary that the sentinels name."""

    Channel = _WorkerSentinelChannel


def worker_transport(settings: Settings) -> type[Transport]:
    """The transport a worker of ``settings`` consumes with."""
    return WorkerSentinelTransport if settings.redis_sentinels else WorkerTransport


def _sentinel_broker(app: Celery) -> bool:
    return str(app.conf.broker_url or "").startswith("sentinel://")


def send_first(app: Celery, name: str, args: Sequence[Any], task_id: str) -> None:
    """Send task ``name`` (routed as any other) so that a worker takes it before every message
    already waiting in its queue; raises what sending raises."""
    front = _FrontSentinelTransport if _sentinel_broker(app) else _FrontTransport
    with app.connection_for_write(transport=front) as connection:
        app.send_task(name, args=list(args), task_id=task_id, connection=connection)
