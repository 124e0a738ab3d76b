"""The FastAPI application: ``create_app(settings)`` wires stores, queue, limits and routers.

Serve it with ``uvicorn smoothcert.service.app:create_app --factory``. This module and
everything it imports stay free of torch and onnxruntime (a test checks it): the API enqueues
tasks by name and reads job records from Redis.

Errors are JSON ``{"detail": ...}``: 422 for invalid requests (without echoing the inputs back),
413 for bodies over the size caps, 503 with ``Retry-After`` when Redis or the broker cannot be
reached (a restart, a Sentinel failover) or when a change could not be confirmed on a replica
(:mod:`smoothcert.service.api.replication`), and 503 with a longer
``Retry-After`` when Redis refuses a write because it holds its memory budget (``maxmemory`` with
``noeviction``: :mod:`smoothcert.service.core.redis_memory`). 500 with a ``detail`` when a job's
result rows should be on the data volume and are not.

Observability: ``/metrics`` (Prometheus text; requests are counted by a middleware) and JSON log
lines that carry the job id (:mod:`smoothcert.service.core.logs`), uvicorn's own lines included.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator

import redis
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError

from smoothcert.service import __version__
from smoothcert.service.api.access_log import AccessLog, SecurityHeaders
from smoothcert.service.api.body_limit import BodySizeLimit
from smoothcert.service.api.deps import document_auth
from smoothcert.service.api.docs import add_offline_docs
from smoothcert.service.api.manual import mount_manual
from smoothcert.service.api.metrics import HttpMetrics, HttpMetricsMiddleware
from smoothcert.service.api.page import mount_page
from smoothcert.service.api.replication import RETRY_AFTER_S, ReplicatedWrites
from smoothcert.service.api.routes import (
    certificates,
    certify,
    datasets,
    health,
    jobs,
    keys,
    metrics,
    models,
    train,
)
from smoothcert.service.core.certificates import CertificateStore
from smoothcert.service.core.dataset_store import DatasetStore
from smoothcert.service.core.issuer import Issuer
from smoothcert.service.core.jobs import JobStore, ResultRowsMissing
from smoothcert.service.core.logs import JobIdMiddleware, configure_logging
from smoothcert.service.core.model_store import ModelStore
from smoothcert.service.core.owners import legacy_names, migrate_legacy_owners
from smoothcert.service.core.queue import make_celery
from smoothcert.service.core.redis_client import connect
from smoothcert.service.core.redis_memory import is_out_of_memory
from smoothcert.service.core.results import ResultFiles
from smoothcert.service.core.settings import Settings
from smoothcert.service.core.signing import SigningKeys
from smoothcert.service.core.store import private_data_dir

log = logging.getLogger("smoothcert.service")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    await run_in_threadpool(_migrate_owners, app)
    # Certificates of the jobs workers finished are signed here, in the background: only API
    # processes hold the signing key (service/core/issuer.py).
    stop = threading.Event()
    drainer = threading.Thread(
        target=app.state.issuer.drain, args=(stop,), name="certificates", daemon=True
    )
    drainer.start()
    try:
        yield
    finally:
        stop.set()
        drainer.join(timeout=5)


def _migrate_owners(app: FastAPI) -> None:
    """Rename the owners of records from the first release with keys to their accounts
    (:func:`~smoothcert.service.core.owners.migrate_legacy_owners`); a Redis that does not answer
    now only postpones it to the next start."""
    s, datasets = app.state.settings, app.state.datasets
    try:
        migrate_legacy_owners(
            app.state.redis, legacy_names(s.api_key, s.admin_key), datasets.list(), datasets.write
        )
    except redis.RedisError as exc:
        log.warning("the owners of older records were not renamed (Redis: %s); next start", exc)


def create_app(settings: Settings | None = None, *, configure_logs: bool = True) -> FastAPI:
    """A configured app; ``settings`` default to the ``SMOOTHCERT_*`` environment.

    ``configure_logs`` sets up this process's logging (the API's JSON lines) and makes what it
    writes private (:func:`~smoothcert.service.core.store.private_data_dir`); code that only
    wants the app object in its own process (the OpenAPI writer, tests) passes False.
    """
    settings = settings or Settings()
    if configure_logs:
        configure_logging(settings, "api")
        private_data_dir(settings.data_dir)  # this process is the API: files 0600, folders 0700
    if settings.generated_api_key:  # never the key itself: logs are not a place for secrets
        log.warning("SMOOTHCERT_API_KEY is not set; this process generated a key of its own")
    app = FastAPI(
        lifespan=_lifespan,
        title="smoothcert",
        version=__version__,  # the package's, written once (service/__init__.py)
        docs_url=None,
        redoc_url=None,
        summary="Certified ℓ2 robustness for image classifiers by randomized smoothing",
    )
    app.state.settings = settings
    app.state.redis = connect(settings, connect_timeout_s=2, timeout_s=10, health_check_interval=30)
    app.state.jobs = JobStore(
        app.state.redis,
        ttl_s=settings.job_ttl_s,
        files=ResultFiles(settings.results_dir, settings.samples_ttl_s),
    )
    app.state.models = ModelStore(settings.models_dir)
    app.state.datasets = DatasetStore(settings.datasets_dir, app.state.redis)
    app.state.queue = make_celery(settings)
    app.state.certificates = CertificateStore(settings.certificates_dir)
    app.state.signing_keys = SigningKeys(settings.signing_dir, settings.signing_key_file)
    app.state.issuer = Issuer(
        app.state.jobs,
        app.state.models,
        app.state.datasets,
        app.state.signing_keys,
        app.state.certificates,
        retention_s=settings.certificate_retention_days * 86400,
    )
    app.state.http_metrics = HttpMetrics()

    # Innermost: with Sentinel, a change is answered 2xx only once a replica holds it.
    app.add_middleware(ReplicatedWrites, client=app.state.redis, settings=settings)
    app.add_middleware(
        BodySizeLimit,
        default_limit=settings.max_request_bytes,
        limits={
            ("POST", "/v1/models"): settings.max_upload_bytes + (1 << 20),
            ("POST", "/v1/datasets"): settings.max_dataset_bytes + (1 << 20),
        },
    )
    app.add_middleware(
        HttpMetricsMiddleware, metrics=app.state.http_metrics, paths=lambda: app.openapi()["paths"]
    )
    app.add_middleware(SecurityHeaders)  # nosniff and no framing on every answer, 413s included
    # one bounded line per request, with the job id JobIdMiddleware found (route templates only)
    app.add_middleware(AccessLog, paths=lambda: app.openapi()["paths"])
    app.add_middleware(JobIdMiddleware)  # outermost: every line of a request knows its job
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(redis.RedisError, _unavailable)
    app.add_exception_handler(OperationalError, _unavailable)
    app.add_exception_handler(ResultRowsMissing, _rows_missing)
    for module in (health, metrics, certify, jobs, certificates, models, datasets, train, keys):
        app.include_router(document_auth(module.router))
    add_offline_docs(app)  # /docs and /redoc with their assets served here, never from a CDN
    mount_manual(app)  # the built manual (make docs) at /manual/
    mount_page(app)
    return app


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    # FastAPI's default echoes each offending value, which can be megabytes of pixels.
    assert isinstance(exc, RequestValidationError)  # the one exception it is registered for
    detail = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


# How long a client told that Redis is full waits before trying again: records expire and
# memory frees over minutes, not seconds.
FULL_RETRY_AFTER_S = 60


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    if is_out_of_memory(exc):
        log.error("Redis is full, a write was refused: %s", exc)
        return JSONResponse(
            {
                "detail": "the job store (Redis) is full: it holds its memory budget "
                "(maxmemory, SMOOTHCERT_REDIS_MAXMEMORY) and refuses new writes until job "
                "records expire or the budget is raised; try again later"
            },
            status_code=503,
            headers={"Retry-After": str(FULL_RETRY_AFTER_S)},
        )
    log.warning("backend unavailable: %s", exc)
    return JSONResponse(
        {"detail": f"the job store or queue (Redis) is unreachable: {exc}"},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},  # a restart or a Sentinel failover
    )


async def _rows_missing(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s", exc)
    return JSONResponse({"detail": str(exc)}, status_code=500)
