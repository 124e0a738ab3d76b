"""Typed FastAPI dependencies: settings, stores, the task queue, bearer-key auth, submission limits.

Auth: every ``/v1`` route needs ``Authorization: Bearer <key>``. A key belongs to an account and
has scopes (``certify``, ``models``, ``train``, ``admin``; :mod:`smoothcert.service.core.keys`):
the keys made with ``POST /v1/keys``, looked up in Redis on every request, and two bootstrap keys
from the settings, ``SMOOTHCERT_ADMIN_KEY`` (account ``admin``, every scope) and
``SMOOTHCERT_API_KEY`` (account ``default``, ``certify``). A missing, malformed (checksum),
unknown, revoked or expired key is 401; a key without the scope a route needs is 403 naming it.
Both are written to the audit log (:mod:`smoothcert.service.api.audit`). Keys are compared in
constant time. A route that creates jobs or datasets takes an
:class:`~smoothcert.service.api.limits.Admission` (rate limit, queue bound, quotas,
``Idempotency-Key``) for the caller's account.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

import redis
from celery import Celery
from fastapi import APIRouter, Depends, Header, HTTPException, Request, status
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from smoothcert.service.api import audit
from smoothcert.service.api.limits import Admission, Limits
from smoothcert.service.core.certificates import CertificateStore
from smoothcert.service.core.dataset_store import DatasetStore
from smoothcert.service.core.issuer import Issuer
from smoothcert.service.core.jobs import JobStore
from smoothcert.service.core.keys import (
    ADMIN_ACCOUNT,
    ADMIN_SCOPE,
    DEFAULT_ACCOUNT,
    SCOPES,
    KeyStore,
    is_key_format,
    parse,
)
from smoothcert.service.core.model_store import ModelStore
from smoothcert.service.core.settings import Settings
from smoothcert.service.core.signing import SigningKeys

_bearer = HTTPBearer(
    auto_error=False,
    description="an API key (sck_..., from POST /v1/keys), or SMOOTHCERT_API_KEY or SMOOTHCERT_ADMIN_KEY",
)


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


def get_issuer(request: Request) -> Issuer:
    return request.app.state.issuer


def get_certificates(request: Request) -> CertificateStore:
    return request.app.state.certificates


def get_signing_keys(request: Request) -> SigningKeys:
    return request.app.state.signing_keys


SettingsDep = Annotated[Settings, Depends(get_settings)]
JobsDep = Annotated[JobStore, Depends(get_jobs)]
ModelsDep = Annotated[ModelStore, Depends(get_models)]
DatasetsDep = Annotated[DatasetStore, Depends(get_datasets)]
QueueDep = Annotated[Celery, Depends(get_queue)]
IssuerDep = Annotated[Issuer, Depends(get_issuer)]
CertificatesDep = Annotated[CertificateStore, Depends(get_certificates)]
SigningKeysDep = Annotated[SigningKeys, Depends(get_signing_keys)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"}
    )


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the account, the key (its id, or the name of the bootstrap key's
    setting) and its scopes."""

    account: str
    key_id: str
    scopes: tuple[str, ...]

    @property
    def owner(self) -> str:
        """The name the account's records, limits and quotas are kept under: the account's."""
        return self.account

    @property
    def admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes

    def allows(self, scope: str) -> bool:
        return self.admin or scope in self.scopes


def _bootstrap(settings: Settings, key: str) -> Caller | None:
    def matches(expected: str) -> bool:
        return bool(expected) and secrets.compare_digest(key.encode(), expected.encode())

    if matches(settings.admin_key):
        return Caller(ADMIN_ACCOUNT, "SMOOTHCERT_ADMIN_KEY", SCOPES)
    if matches(settings.api_key):
        return Caller(DEFAULT_ACCOUNT, "SMOOTHCERT_API_KEY", ("certify",))
    return None


class Refused(Exception):
    """A key that is not let in: the 401's detail, and the key id when the key had one."""

    def __init__(self, detail: str, key_id: str | None = None, account: str | None = None):
        super().__init__(detail)
        self.detail, self.key_id, self.account = detail, key_id, account


def identify(request: Request, key: str) -> Caller:
    """The caller of bearer ``key``: a bootstrap key, or a key of the key store (read from Redis
    on every call, so a revoked key is refused at once on every replica); Refused otherwise."""
    settings: Settings = request.app.state.settings
    caller = _bootstrap(settings, key)
    if caller is not None:
        return caller
    if is_key_format(key):
        key_id = parse(key)
        if key_id is None:  # a typo or a cut: refused before Redis is asked
            raise Refused("malformed key: its checksum does not match (mistyped or cut?)")
        record = get_key_store(request).lookup(key_id, key)
        if record is None:
            raise Refused("invalid API key", key_id)
        if record.expired():
            raise Refused("expired API key", key_id, record.account)
        return Caller(record.account, record.id, record.scopes)
    raise Refused("invalid API key")


def get_key_store(request: Request) -> KeyStore:
    state = request.app.state
    if getattr(state, "keys", None) is None:
        state.keys = KeyStore(state.redis, state.settings.key_pepper)
    return state.keys


KeysDep = Annotated[KeyStore, Depends(get_key_store)]


def require_key(request: Request, creds: Credentials) -> Caller:
    """The caller; 401 without a valid key (missing, malformed, unknown, revoked or expired)."""
    if creds is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    try:
        return identify(request, creds.credentials.strip())
    except Refused as refused:
        audit.refused(request, 401, refused.detail, refused.account, refused.key_id)
        raise _unauthorized(refused.detail) from None


def optional_role(request: Request) -> str | None:
    """The role of the request's bearer key, "admin" or "user", or None without a valid one
    (never 401): for open routes that tell a key holder more. It declares no security scheme, so
    the route stays open in the OpenAPI document."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    try:
        caller = identify(request, key.strip())
    except (Refused, redis.RedisError):
        return None
    return "admin" if caller.admin else "user"


CallerDep = Annotated[Caller, Depends(require_key)]


def get_limits(request: Request) -> Limits:
    """The app's limits, built on first use from its Redis client and settings."""
    state = request.app.state
    if getattr(state, "limits", None) is None:
        state.limits = Limits(state.redis, state.settings, state.models)
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
    request: Request, caller: CallerDep, idempotency_key: IdempotencyKey = None
) -> Admission:
    """This submission's gate: the caller's account's rate limit and quotas, the queue bound and
    its Idempotency-Key."""
    return Admission(
        get_limits(request), caller.owner, f"{request.method} {request.url.path}", idempotency_key
    )


AdmissionDep = Annotated[Admission, Depends(get_admission)]


def _require(scope: str, request: Request, caller: Caller) -> None:
    if not caller.allows(scope):
        detail = f"this needs a key with the {scope!r} scope"
        if scope == ADMIN_SCOPE:
            detail += " (the admin key, SMOOTHCERT_ADMIN_KEY, has it)"
        else:
            detail += f"; this key has {list(caller.scopes)} (the admin key has every scope)"
        audit.refused(request, 403, detail, caller.account, caller.key_id)
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail)


def require_certify(request: Request, caller: CallerDep) -> Caller:
    """403 unless the key has the ``certify`` scope (certify and predict jobs, datasets)."""
    _require("certify", request, caller)
    return caller


def require_models(request: Request, caller: CallerDep) -> Caller:
    """403 unless the key has the ``models`` scope (upload and delete models, pipelines)."""
    _require("models", request, caller)
    return caller


def require_train(request: Request, caller: CallerDep) -> Caller:
    """403 unless the key has the ``train`` scope (training jobs)."""
    _require("train", request, caller)
    return caller


def require_jobs(request: Request, caller: CallerDep) -> Caller:
    """403 unless the key may have jobs: the ``certify`` or the ``train`` scope."""
    if not (caller.allows("certify") or caller.allows("train")):
        detail = (
            "this needs a key with the 'certify' or the 'train' scope; "
            f"this key has {list(caller.scopes)}"
        )
        audit.refused(request, 403, detail, caller.account, caller.key_id)
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail)
    return caller


def require_admin(request: Request, caller: CallerDep) -> Caller:
    """403 unless the key has the ``admin`` scope (key management; the admin key has it)."""
    _require(ADMIN_SCOPE, request, caller)
    return caller


SCOPE_CHECKS = (require_certify, require_models, require_train, require_jobs, require_admin)


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
FORBIDDEN = {"description": "the key lacks the scope this needs", "content": _ERROR_BODY}


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
            if calls & set(SCOPE_CHECKS):
                route.responses.setdefault(status.HTTP_403_FORBIDDEN, FORBIDDEN)
    return router


def _dependency_calls(dependant: Dependant):
    for sub in dependant.dependencies:
        yield sub.call
        yield from _dependency_calls(sub)
