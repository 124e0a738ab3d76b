"""``/healthz`` (the process answers) and ``/readyz`` (Redis answers and a worker is alive); no auth."""
from __future__ import annotations

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from smoothcert.service.api.schemas import Health, WorkerStatus
from smoothcert.service.core.workers import read_workers

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, response_model_exclude_none=True)
def healthz() -> Health:
    """Always 200 while the API process serves requests."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, response_model_exclude_none=True, responses={503: {"model": Health}})
def readyz(request: Request):
    """200 when Redis answers PING and at least one worker's heartbeat key is fresh; else 503.

    ``worker_details`` describes each live worker: its queues and concurrency, and for each pool
    process the device it uses and the models it keeps loaded (with runtime and provider).
    """
    client: redis.Redis = request.app.state.redis
    try:
        client.ping()
        details = read_workers(client)
    except redis.RedisError as exc:
        body = Health(status="not ready", redis="unreachable", workers=[], detail=f"Redis unreachable: {exc}")
        return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
    if not details:
        body = Health(status="not ready", redis="ok", workers=[], detail="no worker is running")
        return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
    return Health(status="ready", redis="ok", workers=[w["name"] for w in details],
                  worker_details=[WorkerStatus.model_validate(w) for w in details])
