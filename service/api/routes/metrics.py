"""``/metrics``: Prometheus text exposition of the API's requests, jobs, queues, workers and samples.

No auth, like ``/healthz``: scrapers rarely carry keys and nothing here names a job or a model.
The numbers and why each is cheap to read are in :mod:`smoothcert.service.api.metrics`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from smoothcert.service.api.limits import Responses
from smoothcert.service.api.metrics import CONTENT_TYPE, exposition

router = APIRouter(tags=["health"])

_DOC: Responses = {
    200: {
        "description": "metrics in the Prometheus text format, version 0.0.4",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


@router.get("/metrics", response_class=PlainTextResponse, responses=_DOC)
async def metrics(request: Request) -> PlainTextResponse:
    """HTTP requests of this API process; jobs by kind and status; Celery queue depths; live
    workers; Monte Carlo samples drawn and the sampling throughput; Redis's memory and its
    budget. Always 200: when Redis cannot be read, the body holds this process's numbers and
    ``smoothcert_redis_up 0``."""
    state = request.app.state
    body = await run_in_threadpool(exposition, state.redis, state.http_metrics)
    return PlainTextResponse(body, media_type=CONTENT_TYPE)
