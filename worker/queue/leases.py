"""Task leases: which worker runs which task, so the task of a dead worker is sent again at once.

Late acknowledgement covers a killed pool process: Celery puts its task back on the queue
immediately. It does not cover a worker whose main process or host dies: Redis hands that
worker's unacknowledged message out again only after the visibility timeout, which must exceed
the task time limit (hours). Leases close that gap.

* A task that starts writes a lease, field ``<task id>`` of the hash ``smoothcert:leases``: the
  worker's name (the one its heartbeat key carries), the worker's incarnation (a random id drawn
  when the worker started), its pid, a fresh token, when it started and the message (task name
  and arguments).
* Every worker's heartbeat thread looks at the leases every few seconds. A lease is dead when
  its worker has no heartbeat key any more (it expires ``SMOOTHCERT_WORKER_HEARTBEAT_TTL_S`` after
  the last beat) or the key names another incarnation: a container restarted after a crash keeps
  its hostname, so the worker's name alone cannot tell the new worker from the dead one. A dead
  lease older than the TTL is taken, atomically, by exactly one looker, which sends the same
  message again under the same task id, to the front of its queue (it was first in line once
  already; :func:`smoothcert.service.core.queue.send_first`). The job's own records make the second run safe: it
  counts as a delivery (the redelivery cap applies), a finished job is not run again, and the
  same seed gives the same answer.
* When Redis finally restores the dead worker's original message, the task finds a lease held
  by a live worker and returns at once (the message is acknowledged; the live worker's copy
  carries the job), or finds the job finished and does nothing.
* A task releases its lease when it returns, whatever the outcome, only if the lease is still
  its own (the token).
* A task writes its job under its lease (:meth:`Lease.fence`,
  :class:`~smoothcert.service.core.jobs.Fence`): a worker cut off from Redis long enough to be
  taken for dead may come back and finish its run, but once another worker has claimed the task
  its status changes and chunk outcomes are refused, so only the run holding the lease decides
  how the job ends.

The Lua scripts read heartbeat keys they are not given in KEYS; that is fine on a single Redis
server (what the service uses) and would need hash tags on a cluster.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import redis

from smoothcert.service.core.jobs import Fence

LEASES_KEY = "smoothcert:leases"

# alive(lease JSON, heartbeat prefix): whether the lease's worker incarnation still beats.
_ALIVE = """
local function alive(lease, prefix)
  local l = cjson.decode(lease)
  local beat = redis.call('GET', prefix .. l['worker'])
  return beat ~= false and cjson.decode(beat)['incarnation'] == l['incarnation']
end
"""

# KEYS[1] leases; ARGV[1] task id, ARGV[2] new lease (JSON), ARGV[3] this worker's incarnation,
# ARGV[4] heartbeat prefix. 1: the lease is ours now; 0: another live worker holds it (a pool
# process of this same worker incarnation may take over: the one before it died).
_CLAIM = (
    _ALIVE
    + """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and cjson.decode(current)['incarnation'] ~= ARGV[3] and alive(current, ARGV[4]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
)

# KEYS[1] leases; ARGV[1] task id, ARGV[2] token. Deletes the lease only if it is still that token's.
_RELEASE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and cjson.decode(current)['token'] == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# KEYS[1] leases; ARGV[1] task id, ARGV[2] the lease as read, ARGV[3] heartbeat prefix.
# Takes (deletes) the lease if it is unchanged and its worker is still dead; 1 if taken.
_TAKE = (
    _ALIVE
    + """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current ~= ARGV[2] or alive(current, ARGV[3]) then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""
)


@dataclass(frozen=True)
class Lease:
    """One running task as its lease records it."""

    task_id: str
    worker: str
    incarnation: str
    pid: int
    token: str
    since: float
    task: str
    args: list[Any]

    def to_json(self) -> str:
        return json.dumps(
            {
                "worker": self.worker,
                "incarnation": self.incarnation,
                "pid": self.pid,
                "token": self.token,
                "since": self.since,
                "task": self.task,
                "args": self.args,
            }
        )

    def fence(self) -> Fence:
        """What this run writes its job under: refused once another run holds the task's lease."""
        return Fence(LEASES_KEY, self.task_id, self.token)

    @classmethod
    def from_json(cls, task_id: str, raw: str | bytes) -> Lease:
        d = json.loads(raw)
        return cls(
            task_id,
            d["worker"],
            d["incarnation"],
            int(d["pid"]),
            d["token"],
            float(d["since"]),
            d["task"],
            d["args"],
        )


class Leases:
    """Claim, release and reap task leases on one Redis connection pool."""

    def __init__(self, client: redis.Redis, heartbeat_prefix: str, heartbeat_ttl_s: float):
        self.redis = client
        self.prefix = heartbeat_prefix
        self.ttl_s = heartbeat_ttl_s
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)
        self._take = client.register_script(_TAKE)

    def claim(
        self, task_id: str, worker: str, incarnation: str, pid: int, task: str, args: list[Any]
    ) -> Lease | None:
        """The new lease of this run, or None when another live worker holds one."""
        lease = Lease(
            task_id,
            worker,
            incarnation,
            pid,
            uuid.uuid4().hex,
            round(time.time(), 3),
            task,
            list(args),
        )
        won = self._claim(
            keys=[LEASES_KEY], args=[task_id, lease.to_json(), incarnation, self.prefix]
        )
        return lease if won == 1 else None

    def release(self, lease: Lease) -> bool:
        return self._release(keys=[LEASES_KEY], args=[lease.task_id, lease.token]) == 1

    def get(self, task_id: str) -> Lease | None:
        raw = self.redis.hget(LEASES_KEY, task_id)
        return None if raw is None else Lease.from_json(task_id, raw)

    def all(self) -> list[Lease]:
        return [Lease.from_json(_text(k), v) for k, v in self.redis.hgetall(LEASES_KEY).items()]

    def reap(
        self,
        resend: Callable[[Lease], None],
        skip_incarnation: str | None = None,
        now: float | None = None,
    ) -> list[Lease]:
        """Take every lease whose worker is dead and call ``resend`` with it; the leases taken.

        A lease younger than the heartbeat TTL is left alone: its worker may not have written its
        first heartbeat yet. So are ``skip_incarnation``'s (the caller's own: it is alive, even if
        its key lapsed while Redis was away). Of several reapers, only the one whose take succeeds
        resends.
        """
        now = time.time() if now is None else now
        raw = self.redis.hgetall(LEASES_KEY)
        if not raw:
            return []
        owners = sorted({json.loads(v)["worker"] for v in raw.values()})
        with self.redis.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.get(self.prefix + owner)
            beats = pipe.execute()
        alive = {json.loads(beat).get("incarnation") for beat in beats if beat}
        taken = []
        for key, value in raw.items():
            lease = Lease.from_json(_text(key), value)
            if (
                lease.incarnation in alive
                or lease.incarnation == skip_incarnation
                or now - lease.since < self.ttl_s
            ):
                continue
            if self._take(keys=[LEASES_KEY], args=[lease.task_id, value, self.prefix]) == 1:
                try:
                    resend(lease)
                except (
                    Exception
                ):  # put it back for the next look; the original message stays as well
                    logging.getLogger(__name__).exception(
                        "could not send task %s again", lease.task_id
                    )
                    self.redis.hsetnx(LEASES_KEY, key, value)
                    continue
                taken.append(lease)
        return taken


def _text(value: bytes | str) -> str:
    """A hash field as text (the client answers bytes unless it decodes responses)."""
    return value.decode() if isinstance(value, bytes) else value
