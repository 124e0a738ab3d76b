"""``/healthz`` (the process answers) and ``/readyz`` (Redis answers and a worker is alive); no auth.

``/readyz`` answers everyone whether the service is ready, and why not; what the workers are
(names, hosts, pids, devices, loaded models) only to a caller with a valid key.
"""
from __future__ import annotations

from typing import Annotated

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from smoothcert.service.api.deps import optional_role
from smoothcert.service.api.schemas import Health, WorkerStatus
from smoothcert.service.core.workers import read_workers

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, response_model_exclude_none=True)
def healthz() -> Health:
    """Always 200 while the API process serves requests."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, response_model_exclude_none=True, responses={503: {"model": Health}})
def readyz(request: Request, role: Annotated[str | None, Depends(optional_role)]):
    """200 when Redis answers PING and at least one worker's heartbeat key is fresh; else 503.

    Without a key the answer is ``status`` (and a ``detail`` saying why when not ready). With the
    API or admin key as a bearer token it adds ``redis``, ``workers`` and ``worker_details``: each
    live worker's queues and concurrency, and for each pool process the device it uses and the
    models it keeps loaded (with runtime and provider).
    """
    client: redis.Redis = request.app.state.redis
    try:
        client.ping()
        details = read_workers(client)
    except redis.RedisError as exc:
        body = Health(status="not ready", redis="unreachable", workers=[], detail=f"Redis unreachable: {exc}")
        return _answer(body, role, 503, detail="Redis unreachable")
    if not details:
        body = Health(status="not ready", redis="ok", workers=[], detail="no worker is running")
        return _answer(body, role, 503)
    body = Health(status="ready", redis="ok", workers=[w["name"] for w in details],
                  worker_details=[WorkerStatus.model_validate(w) for w in details])
    return _answer(body, role, 200)


def _answer(body: Health, role: str | None, status_code: int, detail: str | None = None) -> JSONResponse:
    """``body`` for a key holder; for anyone else its status and ``detail`` (or the shorter one given)."""
    if role is None:
        body = Health(status=body.status, detail=detail or body.detail)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status_code)
