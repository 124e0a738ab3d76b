"""What ``/metrics`` shows, in the Prometheus text format 0.0.4, written without a client library.

Two sources. This API process counts its own HTTP requests (:class:`HttpMetrics`, fed by
:class:`HttpMetricsMiddleware`); with several API processes each reports its own, as Prometheus
expects. Everything else is shared and lives in Redis, read in a few round trips per scrape and
never by scanning job records: the jobs-by-state sets and counters that the job scripts keep
(:mod:`smoothcert.service.core.jobs`), the Celery queues' lengths (kombu keeps each queue as a Redis
list named after it), the workers' heartbeat keys, the sample counters that workers add to
with :func:`record_samples` when a job or a dataset chunk finishes, and Redis's memory against its
budget (one ``INFO memory``).

When Redis cannot be read the scrape still answers 200, with this process's HTTP metrics and
``smoothcert_redis_up 0``, so the outage itself is what alerts. Torch-free: workers import it.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from kombu.transport.redis import Channel
from starlette.routing import compile_path

from smoothcert.service.core.jobs import IN_FLIGHT, METRICS_PREFIX, TERMINAL
from smoothcert.service.core.queue import QUEUE, QUEUES, queue_names
from smoothcert.service.core.redis_memory import read_memory
from smoothcert.service.core.samples import SAMPLES_KEY
from smoothcert.service.core.workers import live_workers

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
JOBS_KEY = METRICS_PREFIX + "jobs:"


# ---------------------------------------------------------------- exposition format


@dataclass
class Family:
    """One metric family: its samples are ``(name suffix, labels, value)``."""

    name: str
    type: str  # counter | gauge | histogram
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, suffix: str = "", **labels: str) -> Family:
        self.samples.append((suffix, labels, value))
        return self


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    """The text exposition of ``families``: HELP and TYPE lines, then one line per sample."""
    lines = []
    for fam in families:
        lines.append(
            f"# HELP {fam.name} {fam.help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}"
        )
        lines.append(f"# TYPE {fam.name} {fam.type}")
        for suffix, labels, value in fam.samples:
            text = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
            lines.append(
                f"{fam.name}{suffix}{{{text}}} {_number(value)}"
                if text
                else f"{fam.name}{suffix} {_number(value)}"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- HTTP requests of this process


class HttpMetrics:
    """Request counts by (method, route, status) and a duration histogram by (method, route)."""

    def __init__(self, buckets: Sequence[float] = DURATION_BUCKETS):
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str], int] = {}
        self._durations: dict[tuple[str, str], list[float]] = {}  # bucket counts..., sum, count

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        with self._lock:
            key = (method, route, str(status))
            self._requests[key] = self._requests.get(key, 0) + 1
            hist = self._durations.setdefault((method, route), [0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if seconds <= bound:
                    hist[i] += 1
            hist[-2] += seconds
            hist[-1] += 1

    def families(self) -> list[Family]:
        requests = Family(
            "smoothcert_http_requests_total",
            "counter",
            "HTTP requests this API process answered, by method, route template and status",
        )
        durations = Family(
            "smoothcert_http_request_duration_seconds",
            "histogram",
            "time this API process took to answer a request, by method and route template",
        )
        with self._lock:
            for (method, route, status), count in sorted(self._requests.items()):
                requests.add(count, method=method, route=route, status=status)
            for (method, route), hist in sorted(self._durations.items()):
                for bound, below in zip(self.buckets, hist):
                    durations.add(below, "_bucket", method=method, route=route, le=_number(bound))
                durations.add(hist[-1], "_bucket", method=method, route=route, le="+Inf")
                durations.add(hist[-2], "_sum", method=method, route=route)
                durations.add(hist[-1], "_count", method=method, route=route)
        return [requests, durations]


def route_label(scope: dict[str, Any], templates: Sequence[tuple[re.Pattern, str]]) -> str:
    """The route template (``/v1/jobs/{job_id}``) a request matched, else ``other``: the label's
    values stay a small fixed set whatever paths clients send. A request answered before routing
    (413 from the body limit) has no route in its scope; its path is matched against ``templates``."""
    route = getattr(scope.get("route"), "path", None)
    if route is None:
        path = scope.get("path", "")
        route = next((template for regex, template in templates if regex.match(path)), None)
    return route or "other"


class RouteTemplates:
    """The app's route templates compiled for :func:`route_label`: ``paths()`` is called once, on
    the first request answered before routing (the metrics and the access log share this)."""

    def __init__(self, paths: Callable[[], Iterable[str]]):
        self.paths = paths
        self._compiled: list[tuple[re.Pattern, str]] | None = None

    def __call__(self) -> list[tuple[re.Pattern, str]]:
        if self._compiled is None:
            self._compiled = [(compile_path(t)[0], t) for t in self.paths()]
        return self._compiled


class HttpMetricsMiddleware:
    """ASGI middleware that times every HTTP request and counts it in ``metrics``.

    ``paths()`` gives the route templates for requests answered before routing (the app's
    OpenAPI paths); it is called once, on the first such request.
    """

    def __init__(self, app, metrics: HttpMetrics, paths: Callable[[], Iterable[str]]):
        self.app, self.metrics, self.templates = app, metrics, RouteTemplates(paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]  # an exception escaping the app ends as a 500

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = route_label(scope, self.templates() if scope.get("route") is None else ())
            self.metrics.observe(scope["method"], route, status[0], time.perf_counter() - started)


# ---------------------------------------------------------------- shared state in Redis


def job_counts(
    client: redis.Redis,
) -> tuple[dict[tuple[str, str], int], dict[str, int], dict[tuple[str, str], int]]:
    """``(in flight by (kind, state), created by kind, finished by (kind, state))``.

    Members of the in-flight sets whose record has expired (score = expiry time, before now on
    Redis's clock) are dropped first, so a job that expired while queued or running stops counting.
    """
    sec, usec = client.time()
    now_ms = sec * 1000 + usec // 1000
    kinds = sorted(_text(k) for k in client.smembers(JOBS_KEY + "kinds"))
    with client.pipeline(transaction=False) as pipe:
        for kind in kinds:
            for state in IN_FLIGHT:
                pipe.zremrangebyscore(f"{JOBS_KEY}{state}:{kind}", "-inf", now_ms)
                pipe.zcard(f"{JOBS_KEY}{state}:{kind}")
        pipe.hgetall(JOBS_KEY + "created")
        pipe.hgetall(JOBS_KEY + "finished")
        replies = pipe.execute()
    cards = iter(replies[1:-2:2])
    in_flight = {(kind, state): int(next(cards)) for kind in kinds for state in IN_FLIGHT}
    created = {k.decode(): int(v) for k, v in replies[-2].items()}
    finished = {_kind_state(k.decode()): int(v) for k, v in replies[-1].items()}
    return in_flight, created, finished


def _kind_state(fieldname: str) -> tuple[str, str]:
    kind, _, state = fieldname.rpartition(":")
    return kind, state


def _text(value: bytes | str) -> str:
    """A reply member as text: this client leaves replies as bytes, redis-py's types allow either."""
    return value.decode() if isinstance(value, bytes) else value


def queue_depths(client: redis.Redis) -> tuple[dict[str, int], int]:
    """Messages waiting in each Celery queue, and messages delivered but not yet acknowledged."""
    with client.pipeline(transaction=False) as pipe:
        for queue in QUEUES:
            for key in queue_names(queue):
                pipe.llen(key)
        pipe.hlen(Channel.unacked_key)
        replies = pipe.execute()
    per = len(queue_names(QUEUE))
    depths = {q: sum(replies[i * per : (i + 1) * per]) for i, q in enumerate(QUEUES)}
    return depths, int(replies[-1])


def samples(client: redis.Redis) -> tuple[int, float]:
    """``(samples drawn, seconds spent drawing them)`` by all workers so far."""
    raw = client.hgetall(SAMPLES_KEY)
    return int(raw.get(b"samples", 0)), float(raw.get(b"seconds", 0.0))


def redis_families(client: redis.Redis) -> list[Family]:
    """The families read from Redis; raises redis.RedisError when it cannot be read."""
    in_flight, created, finished = job_counts(client)
    kinds = sorted({k for k, _ in in_flight} | set(created) | {k for k, _ in finished})
    jobs = Family("smoothcert_jobs", "gauge", "jobs now queued or running, by kind and status")
    for (kind, state), count in sorted(in_flight.items()):
        jobs.add(count, kind=kind, status=state)
    made = Family("smoothcert_jobs_created_total", "counter", "jobs submitted, by kind")
    done = Family(
        "smoothcert_jobs_finished_total",
        "counter",
        "jobs that reached a final status (succeeded, failed, canceled), by kind and status",
    )
    for kind in kinds:
        made.add(created.get(kind, 0), kind=kind)
        for state in sorted(TERMINAL):
            done.add(finished.get((kind, state), 0), kind=kind, status=state)

    depths, unacked = queue_depths(client)
    queued = Family(
        "smoothcert_queue_messages", "gauge", "task messages waiting in each Celery queue"
    )
    for queue, depth in depths.items():
        queued.add(depth, queue=queue)
    taken = Family(
        "smoothcert_queue_unacked_messages",
        "gauge",
        "task messages a worker has taken and not yet acknowledged (running or prefetched)",
    )
    taken.add(unacked)

    workers = Family("smoothcert_workers", "gauge", "workers with a live heartbeat").add(
        live_workers(client)
    )
    drawn, busy = samples(client)
    memory = read_memory(client)
    return [
        jobs,
        made,
        done,
        queued,
        taken,
        workers,
        Family(
            "smoothcert_samples_total",
            "counter",
            "Monte Carlo samples drawn by all workers in finished jobs and dataset chunks",
        ).add(drawn),
        Family(
            "smoothcert_sampling_seconds_total",
            "counter",
            "seconds workers spent drawing those samples; rate(samples)/rate(seconds) is the "
            "throughput of a busy worker",
        ).add(busy),
        Family(
            "smoothcert_samples_per_second",
            "gauge",
            "average throughput of a busy worker since the counters began: samples_total / "
            "sampling_seconds_total (0 before the first sample)",
        ).add(drawn / busy if busy > 0 else 0.0),
        Family(
            "smoothcert_redis_memory_used_bytes",
            "gauge",
            "bytes Redis holds (INFO memory used_memory): job records, queues, limits",
        ).add(memory.used_bytes),
        Family(
            "smoothcert_redis_memory_max_bytes",
            "gauge",
            "Redis's memory budget (maxmemory; 0: none); with noeviction it refuses writes at it, "
            "and the API answers 503",
        ).add(memory.max_bytes),
    ]


def exposition(client: redis.Redis, http: HttpMetrics) -> str:
    """The whole ``/metrics`` body; Redis errors leave out its families and set redis_up to 0."""
    families = http.families()
    try:
        families += redis_families(client)
        up = 1
    except redis.RedisError as exc:
        log.warning("metrics: Redis unreachable: %s", exc)
        up = 0
    families.append(
        Family(
            "smoothcert_redis_up",
            "gauge",
            "1 when this scrape could read Redis (jobs, queues, workers, samples), else 0",
        ).add(up)
    )
    return render(families)
