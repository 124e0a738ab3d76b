"""``/healthz`` (the process answers) and ``/readyz`` (Redis answers, has memory left, and a worker
can take work); no auth.

``/readyz`` answers everyone whether the service is ready, and why not; what the workers are
(names, hosts, pids, devices, loaded models, which of them is stuck) only to a caller with a
valid key.
"""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from smoothcert.service.api.deps import optional_role
from smoothcert.service.api.schemas import Health, RedisMemoryStatus, WorkerStatus
from smoothcert.service.core.redis_memory import read_memory
from smoothcert.service.core.workers import read_workers, worker_trouble

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, response_model_exclude_none=True)
def healthz() -> Health:
    """Always 200 while the API process serves requests."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    response_model_exclude_none=True,
    responses={503: {"model": Health}},
)
def readyz(request: Request, role: Annotated[str | None, Depends(optional_role)]):
    """200 when Redis answers PING, is below its memory budget (at it, it refuses writes) and at
    least one worker with a fresh heartbeat key can take work; else 503. A worker cannot take
    work when its heartbeat is older than two beats, or when every pool process is inside one
    batch past its watchdog's limit (:func:`~smoothcert.service.core.workers.worker_trouble`); a
    ``detail`` names what is wrong (for a caller without a key: how many workers).

    Without a key the answer is ``status`` (and a ``detail`` saying why when not ready). With the
    API or admin key as a bearer token it adds ``redis``, ``redis_memory`` (bytes used, the
    budget, the eviction policy), ``workers`` and ``worker_details``: each live worker's queues
    and concurrency, and for each pool process the device it uses and the models it keeps loaded
    (with runtime and provider).
    """
    client: redis.Redis = request.app.state.redis
    try:
        client.ping()
        details = read_workers(client)
        memory = read_memory(client)
    except redis.RedisError as exc:
        body = Health(
            status="not ready", redis="unreachable", workers=[], detail=f"Redis unreachable: {exc}"
        )
        return _answer(body, role, 503, detail="Redis unreachable")
    held = RedisMemoryStatus(
        used_bytes=memory.used_bytes, max_bytes=memory.max_bytes, policy=memory.policy
    )
    if memory.full:
        body = Health(
            status="not ready",
            redis="full",
            redis_memory=held,
            workers=[w["name"] for w in details],
            detail=f"Redis is full ({memory.describe()}): it refuses writes, so no job can be "
            "submitted or recorded until records expire or SMOOTHCERT_REDIS_MAXMEMORY is raised",
        )
        return _answer(body, role, 503, detail="Redis is full: it refuses new jobs")
    if not details:
        body = Health(
            status="not ready",
            redis="ok",
            redis_memory=held,
            workers=[],
            detail="no worker is running",
        )
        return _answer(body, role, 503)
    troubles = [worker_trouble(w) for w in details]
    notes = [note for _, worker_notes in troubles for note in worker_notes]
    blocked = sum(1 for out, _ in troubles if out)
    ready = blocked < len(details)
    body = Health(
        status="ready" if ready else "not ready",
        redis="ok",
        redis_memory=held,
        workers=[w["name"] for w in details],
        worker_details=[WorkerStatus.model_validate(w) for w in details],
        detail=None
        if not notes
        else ("" if ready else "no worker can take work: ") + "; ".join(notes),
    )
    if not notes:
        return _answer(body, role, 200)
    troubled = sum(1 for _, worker_notes in troubles if worker_notes)
    anonymous = (
        f"{troubled} of {len(details)} workers have a pool process stuck or stopped answering"
        if ready
        else "no worker can take work: every worker is stuck or stopped answering"
    )
    return _answer(body, role, 200 if ready else 503, detail=anonymous)


def _answer(
    body: Health, role: str | None, status_code: int, detail: str | None = None
) -> JSONResponse:
    """``body`` for a key holder; for anyone else its status and ``detail`` (or the shorter one given)."""
    if role is None:
        body = Health(status=body.status, detail=detail or body.detail)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status_code)
