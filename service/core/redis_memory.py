"""Redis's memory against its budget, and how a write it refuses for want of memory looks.

The Redis of ``smoothcert up`` and of the compose deployment runs with ``maxmemory``
(``SMOOTHCERT_REDIS_MAXMEMORY``) and ``maxmemory-policy noeviction``: nothing it holds may be
dropped (job records, queued messages, leases, limits), so at its budget it refuses writes with an
``OOM`` error instead, which the API answers with 503 and ``/readyz`` and ``/metrics`` show.
Torch-free: the API and the workers both use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

POLICY = "noeviction"


@dataclass(frozen=True)
class RedisMemory:
    """``INFO memory``'s figures: bytes in use, the budget (0: none) and the eviction policy."""

    used_bytes: int
    max_bytes: int
    policy: str

    @property
    def full(self) -> bool:
        """Whether Redis is at its budget, where (with noeviction) it refuses writes."""
        return self.max_bytes > 0 and self.used_bytes >= self.max_bytes

    def describe(self) -> str:
        """``"12.3 MiB of 1024.0 MiB (1%)"``, or ``"12.3 MiB, no budget"``."""
        used = f"{self.used_bytes / (1 << 20):.1f} MiB"
        if not self.max_bytes:
            return f"{used}, no budget (maxmemory 0)"
        share = 100 * self.used_bytes / self.max_bytes
        return f"{used} of {self.max_bytes / (1 << 20):.1f} MiB ({share:.0f}%)"


def read_memory(client: redis.Redis) -> RedisMemory:
    """One ``INFO memory``; redis.RedisError when Redis cannot be read."""
    info = client.info("memory")
    return RedisMemory(
        used_bytes=int(info.get("used_memory", 0)),
        max_bytes=int(info.get("maxmemory", 0)),
        policy=str(info.get("maxmemory_policy", "")),
    )


def is_out_of_memory(exc: BaseException | None) -> bool:
    """Whether ``exc`` is Redis refusing a write because it holds its ``maxmemory`` (a command, a
    script or a transaction that held one), or an error raised from one (kombu re-raises Redis's
    errors as its own)."""
    for _ in range(4):
        if exc is None:
            return False
        if isinstance(exc, redis.exceptions.OutOfMemoryError) or (
            isinstance(exc, redis.ResponseError) and "OOM command not allowed" in str(exc)
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
