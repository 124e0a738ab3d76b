"""Typed FastAPI dependencies: settings, stores, the task queue, bearer-key auth, submission limits.

Auth: every ``/v1`` route needs ``Authorization: Bearer <api key>`` (the admin key works too);
model upload and delete need the admin key. A missing or unknown key is 401, a valid key
without the admin right is 403. Keys are compared in constant time. A route that creates jobs
or datasets takes an :class:`~smoothcert.service.api.limits.Admission` (rate limit, queue bound,
``Idempotency-Key``) for the caller's key.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from celery import Celery
from fastapi import APIRouter, Depends, Header, HTTPException, Request, status
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from smoothcert.service.api.limits import Admission, Limits, caller_id
from smoothcert.service.core.dataset_store import DatasetStore
from smoothcert.service.core.jobs import JobStore
from smoothcert.service.core.model_store import ModelStore
from smoothcert.service.core.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="the API key, or the admin key")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs


def get_models(request: Request) -> ModelStore:
    return request.app.state.models


def get_datasets(request: Request) -> DatasetStore:
    return request.app.state.datasets


def get_queue(request: Request) -> Celery:
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(get_settings)]
JobsDep = Annotated[JobStore, Depends(get_jobs)]
ModelsDep = Annotated[ModelStore, Depends(get_models)]
DatasetsDep = Annotated[DatasetStore, Depends(get_datasets)]
QueueDep = Annotated[Celery, Depends(get_queue)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _matches(given: str, expected: str) -> bool:
    return bool(expected) and secrets.compare_digest(given.encode(), expected.encode())


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"}
    )


def _role(settings: Settings, key: str) -> str | None:
    if _matches(key, settings.admin_key):
        return "admin"
    if _matches(key, settings.api_key):
        return "user"
    return None


def require_key(settings: SettingsDep, creds: Credentials) -> str:
    """The caller's role, "user" or "admin"; 401 without a valid key."""
    if creds is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    role = _role(settings, creds.credentials)
    if role is None:
        raise _unauthorized("invalid API key")
    return role


def optional_role(request: Request) -> str | None:
    """The role of the request's bearer key, or None without a valid one (never 401): for open
    routes that tell a key holder more. It declares no security scheme, so the route stays open
    in the OpenAPI document."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return _role(request.app.state.settings, key.strip())


Role = Annotated[str, Depends(require_key)]


def get_limits(request: Request) -> Limits:
    """The app's limits, built on first use from its Redis client and settings."""
    state = request.app.state
    if getattr(state, "limits", None) is None:
        state.limits = Limits(state.redis, state.settings)
    return state.limits


LimitsDep = Annotated[Limits, Depends(get_limits)]


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[!-~]+$",
        description="up to 255 visible ASCII characters, new for each new request (a UUID, say): "
        "a repeat with the same key and request (from this API key, within "
        "SMOOTHCERT_IDEMPOTENCY_TTL_S) gets the first answer again instead of creating another job",
    ),
]


def get_admission(
    request: Request, creds: Credentials, role: Role, idempotency_key: IdempotencyKey = None
) -> Admission:
    """This submission's gate: the caller's rate limit, the queue bound and its Idempotency-Key."""
    if creds is None:  # require_key (``role``) has refused it already
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return Admission(
        get_limits(request),
        caller_id(creds.credentials),
        f"{request.method} {request.url.path}",
        idempotency_key,
    )


AdmissionDep = Annotated[Admission, Depends(get_admission)]


def require_admin(role: Role) -> None:
    """403 unless the caller used the admin key."""
    if role != "admin":
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "this needs the admin key (SMOOTHCERT_ADMIN_KEY)"
        )


_ERROR_BODY = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["detail"],
            "properties": {"detail": {"type": "string"}},
        }
    }
}
UNAUTHORIZED = {"description": "missing or invalid API key", "content": _ERROR_BODY}
FORBIDDEN = {"description": "the admin key is needed", "content": _ERROR_BODY}


def document_auth(router: APIRouter) -> APIRouter:
    """Declare in ``router``'s OpenAPI entries the 401 and 403 answers its key checks can give.

    FastAPI documents the responses a route declares, not those its dependencies raise; reading
    each route's dependency tree keeps the document from forgetting one. Idempotent.
    """
    for route in router.routes:
        if isinstance(route, APIRoute):
            calls = set(_dependency_calls(route.dependant))
            if require_key in calls:
                route.responses.setdefault(status.HTTP_401_UNAUTHORIZED, UNAUTHORIZED)
            if require_admin in calls:
                route.responses.setdefault(status.HTTP_403_FORBIDDEN, FORBIDDEN)
    return router


def _dependency_calls(dependant: Dependant):
    for sub in dependant.dependencies:
        yield sub.call
        yield from _dependency_calls(sub)
