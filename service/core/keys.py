"""API keys and accounts, kept in the service's Redis (torch-free; the API uses it on every request).

A key is ``sck_<id>_<secret><check>``: the prefix, a 12-character key id, a 256-bit secret (43
base62 characters) and a checksum (the CRC32 of everything before it, 6 base62 characters), so
secret scanners can recognise a leaked key and a mistyped one is refused before any lookup.

Redis holds, per key, only a keyed hash of the whole key (HMAC-SHA256 with
``SMOOTHCERT_KEY_PEPPER``), never the key::

    smoothcert:apikey:<id>               hash: id, account, scopes (comma-separated), name,
                                         created_at, expires_at (Unix seconds, '' for never),
                                         digest (the HMAC, hex)
    smoothcert:apikeys                   zset: key id -> created (ms), every key
    smoothcert:account:<account>:keys    zset: key id -> created (ms), the account's keys
    smoothcert:accounts                  hash: account -> created (Unix seconds); an account is
                                         created with its first key

Revoking a key deletes its record, so the next request with it, on any API replica, is refused:
every request reads the record (no cache).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from smoothcert.service.core.jobs import rfc3339

# Kept with the records they name (torch- and redis-free); re-exported for the key's callers.
from smoothcert.service.core.store import ADMIN_ACCOUNT as ADMIN_ACCOUNT
from smoothcert.service.core.store import DEFAULT_ACCOUNT as DEFAULT_ACCOUNT
from smoothcert.service.core.store import account_of as account_of

PREFIX = "sck_"
SCOPES = ("certify", "models", "train", "admin")
ADMIN_SCOPE = "admin"
ID_LEN, SECRET_LEN, CHECK_LEN = 12, 43, 6
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_FORMAT = re.compile(
    rf"^{PREFIX}([0-9A-Za-z]{{{ID_LEN}}})_([0-9A-Za-z]{{{SECRET_LEN}}})([0-9A-Za-z]{{{CHECK_LEN}}})$"
)
KEY_ID = re.compile(rf"^[0-9A-Za-z]{{{ID_LEN}}}$")
# An account name; 32 hex digits are refused, since those name the callers of the bootstrap keys.
ACCOUNT = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")

KEY_RECORD = "smoothcert:apikey:"
KEYS_INDEX = "smoothcert:apikeys"
ACCOUNTS = "smoothcert:accounts"


def account_keys_key(account: str) -> str:
    """The zset of ``account``'s key ids."""
    return f"smoothcert:account:{account}:keys"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def valid_account(name: str) -> bool:
    return ACCOUNT.match(name) is not None and _HEX32.match(name) is None


def _b62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, rest = divmod(number, 62)
        digits.append(_B62[rest])
    return "".join(reversed(digits))


def checksum(body: str) -> str:
    """The 6 base62 characters that end a key: the CRC32 of the text before them."""
    return _b62(zlib.crc32(body.encode()), CHECK_LEN)


def new_key() -> tuple[str, str]:
    """A fresh key id and the whole key."""
    key_id = "".join(secrets.choice(_B62) for _ in range(ID_LEN))
    body = f"{PREFIX}{key_id}_{_b62(secrets.randbits(256), SECRET_LEN)}"
    return key_id, body + checksum(body)


def is_key_format(key: str) -> bool:
    """Whether ``key`` claims to be one of these keys (starts with the prefix)."""
    return key.startswith(PREFIX)


def parse(key: str) -> str | None:
    """The key id of a well-formed key whose checksum holds; None otherwise (a typo, a cut)."""
    match = _FORMAT.match(key)
    if match is None:
        return None
    body = key[:-CHECK_LEN]
    if not hmac.compare_digest(checksum(body), match.group(3)):
        return None
    return match.group(1)


def digest(pepper: str, key: str) -> str:
    """What Redis keeps of a key: HMAC-SHA256 with the server's pepper, hex."""
    return hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()


def normal_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
    """``scopes`` without repeats, in SCOPES order; ValueError for an unknown or no scope."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scopes {unknown}; the scopes are {list(SCOPES)}")
    if not scopes:
        raise ValueError(f"a key needs at least one scope of {list(SCOPES)}")
    return tuple(s for s in SCOPES if s in scopes)


@dataclass(frozen=True)
class KeyRecord:
    """One key as stored, without its secret."""

    id: str
    account: str
    scopes: tuple[str, ...]
    name: str | None
    created_at: float
    expires_at: float | None

    def expired(self, now: float | None = None) -> bool:
        return (
            self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at
        )

    def public(self) -> dict[str, Any]:
        """The key as the API shows it: no secret, times as RFC 3339."""
        return {
            "id": self.id,
            "account": self.account,
            "scopes": list(self.scopes),
            "name": self.name,
            "created_time": rfc3339(self.created_at),
            "expires_time": rfc3339(self.expires_at),
        }

    @classmethod
    def from_hash(cls, fields: Any) -> KeyRecord:
        text = {_text(k): _text(v) for k, v in fields.items()}
        return cls(
            id=text["id"],
            account=text["account"],
            scopes=tuple(s for s in text["scopes"].split(",") if s),
            name=text.get("name") or None,
            created_at=float(text["created_at"]),
            expires_at=float(text["expires_at"]) if text.get("expires_at") else None,
        )


class KeyStore:
    """Keys and accounts in Redis (the module docstring)."""

    def __init__(self, client: redis.Redis, pepper: str):
        self.redis, self.pepper = client, pepper

    def create(
        self,
        account: str,
        scopes: Sequence[str],
        name: str | None = None,
        expires_in_s: float | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key of ``account`` (created with its first key): its record and the key, which
        is returned here once and kept nowhere."""
        if not valid_account(account):
            raise ValueError(
                f"invalid account name {account!r}: a lowercase letter, then up to 62 lowercase "
                "letters, digits, '_' or '-' (and not 32 hex digits)"
            )
        now = time.time()
        key_id, key = new_key()
        record = KeyRecord(
            id=key_id,
            account=account,
            scopes=normal_scopes(scopes),
            name=name,
            created_at=now,
            expires_at=None if expires_in_s is None else now + expires_in_s,
        )
        fields: dict[Any, Any] = {
            "id": key_id,
            "account": account,
            "scopes": ",".join(record.scopes),
            "name": name or "",
            "created_at": repr(now),
            "expires_at": "" if record.expires_at is None else repr(record.expires_at),
            "digest": digest(self.pepper, key),
        }
        score = round(now * 1000)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(KEY_RECORD + key_id, mapping=fields)
            pipe.zadd(KEYS_INDEX, {key_id: score})
            pipe.zadd(account_keys_key(account), {key_id: score})
            pipe.hsetnx(ACCOUNTS, account, repr(now))
            pipe.execute()
        return record, key

    def get(self, key_id: str) -> KeyRecord | None:
        if KEY_ID.match(key_id) is None:
            return None
        fields: Any = self.redis.hgetall(KEY_RECORD + key_id)
        return KeyRecord.from_hash(fields) if fields else None

    def lookup(self, key_id: str, key: str) -> KeyRecord | None:
        """The record of ``key`` (whose id, from :func:`parse`, is ``key_id``) when its keyed hash
        matches the stored one (compared in constant time); None for an unknown or revoked key."""
        fields: Any = self.redis.hgetall(KEY_RECORD + key_id)
        stored = fields.get(b"digest")
        if not stored or not hmac.compare_digest(_text(stored), digest(self.pepper, key)):
            return None
        return KeyRecord.from_hash(fields)

    def list(self, account: str | None = None) -> list[KeyRecord]:
        """Every key (``account`` None) or ``account``'s, oldest first."""
        index = KEYS_INDEX if account is None else account_keys_key(account)
        ids = [_text(i) for i in cast(Any, self.redis.zrange(index, 0, -1))]
        if not ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(KEY_RECORD + key_id)
            found = pipe.execute()
        gone = [i for i, fields in zip(ids, found) if not fields]
        if gone:
            self.redis.zrem(index, *gone)
        return [KeyRecord.from_hash(fields) for fields in found if fields]

    def revoke(self, key_id: str) -> KeyRecord | None:
        """Delete the key; its record as it was, or None when there was none."""
        record = self.get(key_id)
        if record is None:
            return None
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(KEY_RECORD + key_id)
            pipe.zrem(KEYS_INDEX, key_id)
            pipe.zrem(account_keys_key(record.account), key_id)
            pipe.execute()
        return record
