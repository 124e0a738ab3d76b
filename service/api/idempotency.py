"""``Idempotency-Key``: a client may retry a submission without creating a second job.

A request that carries the header reserves ``smoothcert:idempotency:<caller>:<sha256(key)>`` with
``SET NX`` before any work, so of two concurrent requests with one key only one goes on; the
record then holds the answer (status, body, ``Location``) for ``SMOOTHCERT_IDEMPOTENCY_TTL_S``.
Keys are scoped per API key (``<caller>`` is a hash of it, never the key itself). The record
also holds a fingerprint of the request (route plus the parsed body: canonical JSON, or the
multipart fields and the SHA-256 of each file, so two clients' different multipart boundaries
do not matter); the same key with another fingerprint is a client error. A request that fails
releases its reservation, so only accepted submissions are remembered. Finishing and releasing
go through one Lua script that touches the record only while it is this request's reservation.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import IO, Any

import redis

PREFIX = "smoothcert:idempotency:"
PENDING_TTL_S = 300  # a reservation whose API process died frees itself after this
PENDING_RETRY_AFTER_S = 1  # what a concurrent duplicate is told to wait

# KEYS[1] record; ARGV[1] our token; ARGV[2] the finished record ("" releases); ARGV[3] its ttl.
# Touches the record only while it is absent or still ours; returns 1 when it did.
_FINISH = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current)['token'] ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return 1
"""


@dataclass(frozen=True)
class Remembered:
    """Another request's record for the key: finished (``answer`` set) or still in progress."""

    fingerprint: str
    answer: dict[str, Any] | None


def fingerprint(route: str, content: Any) -> str:
    """SHA-256 of the route and a JSON-able normal form of the request."""
    text = json.dumps({"route": route, "content": content}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def json_content(body: bytes) -> Any:
    """A JSON body in normal form (key order and whitespace do not matter), or its hash when malformed."""
    try:
        return {"json": json.loads(body)}
    except (ValueError, UnicodeDecodeError):
        return {"raw": hashlib.sha256(body).hexdigest()}


def file_sha256(stream: IO[bytes]) -> str:
    """SHA-256 of a seekable upload, which is rewound for its reader."""
    digest = hashlib.sha256()
    stream.seek(0)
    while block := stream.read(1 << 20):
        digest.update(block)
    stream.seek(0)
    return digest.hexdigest()


class IdempotencyStore:
    """Reservations and remembered answers; every method is one or two Redis round trips."""

    def __init__(self, client: redis.Redis, ttl_s: int):
        self.redis, self.ttl_s = client, ttl_s
        self._finish = client.register_script(_FINISH)

    @staticmethod
    def key(caller: str, idempotency_key: str) -> str:
        return f"{PREFIX}{caller}:{hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]}"

    def reserve(self, key: str, fingerprint: str) -> tuple[str | None, Remembered | None]:
        """``(token, None)`` when this request now holds the key, ``(None, record)`` when another does."""
        token = secrets.token_hex(16)
        pending = json.dumps({"token": token, "fingerprint": fingerprint, "answer": None})
        for _ in range(3):  # the other record may expire between SET NX and GET
            if self.redis.set(key, pending, nx=True, ex=PENDING_TTL_S):
                return token, None
            raw = self.redis.get(key)
            if raw is not None:
                record = json.loads(raw)
                return None, Remembered(record["fingerprint"], record["answer"])
        raise redis.RedisError(f"could not reserve idempotency key {key}")

    def remember(self, key: str, token: str, fingerprint: str, answer: dict[str, Any]) -> bool:
        """Keep ``answer`` for the TTL; False when the reservation was no longer ours."""
        record = json.dumps({"token": token, "fingerprint": fingerprint, "answer": answer})
        return self._finish(keys=[key], args=[token, record, self.ttl_s]) == 1

    def release(self, key: str, token: str) -> None:
        """Drop our reservation (the request failed), so the key can be used again."""
        self._finish(keys=[key], args=[token, "", self.ttl_s])
