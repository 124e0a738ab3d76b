"""Typed FastAPI dependencies: settings, stores, the task queue, and bearer-key auth.

Auth: every ``/v1`` route needs ``Authorization: Bearer <api key>`` (the admin key works too);
model upload and delete need the admin key. A missing or unknown key is 401, a valid key
without the admin right is 403. Keys are compared in constant time.
"""
from __future__ import annotations

import secrets
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from smoothcert.models.store import ModelStore
from smoothcert.service.jobs import JobStore
from smoothcert.service.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="the API key, or the admin key")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs


def get_models(request: Request) -> ModelStore:
    return request.app.state.models


def get_queue(request: Request) -> Celery:
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(get_settings)]
JobsDep = Annotated[JobStore, Depends(get_jobs)]
ModelsDep = Annotated[ModelStore, Depends(get_models)]
QueueDep = Annotated[Celery, Depends(get_queue)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _matches(given: str, expected: str) -> bool:
    return bool(expected) and secrets.compare_digest(given.encode(), expected.encode())


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


def require_key(settings: SettingsDep, creds: Credentials) -> str:
    """The caller's role, "user" or "admin"; 401 without a valid key."""
    if creds is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if _matches(creds.credentials, settings.admin_key):
        return "admin"
    if _matches(creds.credentials, settings.api_key):
        return "user"
    raise _unauthorized("invalid API key")


Role = Annotated[str, Depends(require_key)]


def require_admin(role: Role) -> None:
    """403 unless the caller used the admin key."""
    if role != "admin":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs the admin key (SMOOTHCERT_ADMIN_KEY)")
