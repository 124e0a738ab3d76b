"""The audit trail: one JSON log line (logger ``smoothcert.audit``) per key created or revoked and
per request refused with 401 or 403, with the account and the key id when known; never a key."""

from __future__ import annotations

import logging

from fastapi import Request

from smoothcert.service.core.keys import KeyRecord

log = logging.getLogger("smoothcert.audit")


def _line(level: int, event: str, **fields: object) -> None:
    shown = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    log.log(level, "%s %s", event, shown, extra={"audit": {"event": event, **fields}})


def created(record: KeyRecord, by: str) -> None:
    _line(
        logging.INFO,
        "key_created",
        account=record.account,
        key_id=record.id,
        scopes=",".join(record.scopes),
        by=by,
    )


def revoked(record: KeyRecord, by: str) -> None:
    _line(logging.INFO, "key_revoked", account=record.account, key_id=record.id, by=by)


def refused(
    request: Request, status_code: int, reason: str, account: str | None, key_id: str | None
) -> None:
    _line(
        logging.WARNING,
        "refused",
        status=status_code,
        reason=reason,
        account=account,
        key_id=key_id,
        method=request.method,
        path=request.url.path[:200],  # no caller lengthens a line much
    )
