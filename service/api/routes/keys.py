"""Accounts and API keys: ``POST /v1/keys`` (admin) makes a key, ``GET /v1/keys`` lists them
(the admin every key, anyone else their account's), ``DELETE /v1/keys/{id}`` revokes one (the
admin, or a key of the same account), ``GET /v1/whoami`` says who the caller is.

A key's secret is in the answer to ``POST /v1/keys`` and nowhere else: Redis keeps an HMAC of
it (:mod:`smoothcert.service.core.keys`), the audit log its id.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status

from smoothcert.service.api import audit
from smoothcert.service.api.body_limit import UnparsableBodyRoute
from smoothcert.service.api.deps import CallerDep, KeysDep, require_admin, require_key
from smoothcert.service.api.schemas import KeyInfo, KeyList, KeyRequest, NewKey, WhoAmI
from smoothcert.service.core.keys import valid_account

router = APIRouter(
    prefix="/v1",
    tags=["keys"],
    dependencies=[Depends(require_key)],
    route_class=UnparsableBodyRoute,
)  # a body that cannot be parsed is 422, not 400


@router.post(
    "/keys",
    status_code=status.HTTP_201_CREATED,
    response_model=NewKey,
    dependencies=[Depends(require_admin)],
    responses={
        413: {"description": "body too large"},
        422: {"description": "invalid account, scopes, name or expiry"},
    },
)
def create_key(body: KeyRequest, keys: KeysDep, caller: CallerDep) -> NewKey:
    """A new key of ``account`` with ``scopes`` (the account is created with its first key). The
    answer holds the key; it is shown only here, so keep it."""
    if not valid_account(body.account):
        raise HTTPException(422, f"invalid account name {body.account!r}: not 32 hex digits")
    record, key = keys.create(body.account, body.scopes, body.name, body.expires_in_s)
    audit.created(record, by=f"{caller.account}/{caller.key_id}")
    return NewKey(key=key, **record.public())


@router.get("/keys", response_model=KeyList)
def list_keys(keys: KeysDep, caller: CallerDep) -> KeyList:
    """The keys the caller may see, oldest first, without their secrets: every key for the admin,
    the caller's account's otherwise. The bootstrap keys of the settings are not listed."""
    records = keys.list(None if caller.admin else caller.account)
    return KeyList(keys=[KeyInfo(**r.public()) for r in records])


@router.delete(
    "/keys/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={404: {"description": "no such key in the caller's account"}},
)
def revoke_key(key_id: str, request: Request, keys: KeysDep, caller: CallerDep) -> Response:
    """Revoke a key: from then on it is refused (401) by every API replica. The admin may revoke
    any key, another caller only its account's (another account's key is 404)."""
    record = keys.get(key_id)
    if record is None or (not caller.admin and record.account != caller.account):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown key {key_id[:40]!r}")
    revoked = keys.revoke(key_id)
    if revoked is not None:
        audit.revoked(revoked, by=f"{caller.account}/{caller.key_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/whoami", response_model=WhoAmI)
def whoami(caller: CallerDep) -> WhoAmI:
    """The caller's account, key id and scopes, and whether it is an admin."""
    return WhoAmI(
        account=caller.account,
        key_id=caller.key_id,
        scopes=list(caller.scopes),
        admin=caller.admin,
    )
