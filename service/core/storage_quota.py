"""The storage quota's Redis side, shared by the API and the workers: what a key's datasets, the
inputs of its jobs and its certificates hold against ``SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY``, and
the sweep of job inputs left behind.

A key's reservations are a sorted set ``smoothcert:storage:<caller>`` (token -> when it lapses,
Redis-clock ms) and a hash ``smoothcert:storage:<caller>:amounts`` (token -> bytes); a reservation
counts until it lapses or is given back. A dataset upload's token is its dataset id
(:mod:`smoothcert.service.api.limits` says why it outlives the upload). A certify job's inputs,
``DATA_DIR/jobs/<id>/inputs.npy``, are reserved as ``job:<id>`` (what the file and its folder
take on disk, in whole blocks, as a dataset counts: :func:`inputs_disk_bytes`) by the API before
the file is written (:meth:`JobInputs.reserve`: over the quota, nothing is written) and given
back by whoever deletes the folder (:func:`drop_job_inputs`): the API when a submission fails or
a queued job is canceled, the worker when the job ends, or the sweep. Such a reservation lapses only
:func:`inputs_ttl_ms` after it was made (the job record's TTL plus twice the grace below), so it
counts for as long as the inputs can be on disk. A signed certificate
(:mod:`smoothcert.service.core.issuer`) is held as ``certificate:<sha256>``, its size on disk, for
its retention (``SMOOTHCERT_CERTIFICATE_RETENTION_DAYS``), or until it is deleted.

Each inputs reservation is also indexed with its owner and the time it was made:
``smoothcert:job-inputs`` (sorted set: job id -> reserved at, ms) and
``smoothcert:job-inputs:owners`` (hash: job id -> caller). :func:`sweep_orphan_inputs`, which the
workers' heartbeat threads run, takes the entries older than ``SMOOTHCERT_ORPHAN_INPUTS_GRACE_S``
whose job record is missing (the API died between writing the inputs and the record) or ended
(whoever ended it died before deleting them), deletes their folders and gives them back. The grace
covers a submission still between its write and its record. A folder no reservation names (written
before inputs were counted, or its Redis lost its data) goes once it is older than a job record
lives and its record is missing or ended. Several workers may sweep: a lock lets one sweep per
interval, and every step is idempotent.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import redis

from smoothcert.service.core.jobs import PREFIX as JOB_PREFIX
from smoothcert.service.core.jobs import TERMINAL, is_job_id, job_folder
from smoothcert.service.core.store import block_size, disk_bytes

log = logging.getLogger(__name__)

STORAGE_PREFIX = "smoothcert:storage:"
INPUTS_INDEX = "smoothcert:job-inputs"
INPUTS_OWNERS = INPUTS_INDEX + ":owners"
SWEEP_LOCK = INPUTS_INDEX + ":sweep"
INPUTS_TOKEN = "job:"
CERTIFICATE_TOKEN = "certificate:"

# Lua: drop the entries of zset KEYS[1] (member = token, score = expiry ms) and of hash KEYS[2]
# (token -> amount) that have expired, and sum the others (``held``); ``now`` is Redis' clock in
# ms. ``hold`` adds one; the two keys live as long as their longest entry.
LAPSE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do redis.call('HDEL', KEYS[2], gone) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do held = held + tonumber(v) end
local function hold(token, amount, ttl)
  redis.call('ZADD', KEYS[1], now + ttl, token)
  redis.call('HSET', KEYS[2], token, amount)
  for i = 1, 2 do
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
"""

# After LAPSE_LUA on a caller's reservations: reserve(first) holds ARGV[2] bytes under token
# ARGV[1] for ARGV[5] ms when they fit the quota ARGV[3] beside the caller's stored datasets
# (ARGV[4] bytes; their ids are ARGV[first..]: a dataset seen stored is counted there, not also
# through its reservation) and what the caller holds. Returns 1 or 0, and the bytes in use before.
_RESERVE = """
local function reserve(first)
  for i = first, #ARGV do
    held = held - tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or 0)
  end
  local used = tonumber(ARGV[4]) + held
  if used + tonumber(ARGV[2]) > tonumber(ARGV[3]) then return 0, used end
  hold(ARGV[1], ARGV[2], tonumber(ARGV[5]))
  return 1, used
end
"""

# A dataset upload. KEYS[1], KEYS[2] the caller's reservations; ARGV[1] dataset id, ARGV[2] bytes
# it will store, ARGV[3] quota, ARGV[4] bytes of the caller's stored datasets, ARGV[5] ttl ms,
# ARGV[6..] those datasets' ids. Returns {1 when reserved, the bytes in use before this upload}.
STORAGE_LUA = LAPSE_LUA + _RESERVE + "local ok, used = reserve(6)\nreturn {ok, used}\n"

# A job's inputs: as STORAGE_LUA with ARGV[1] its token, ARGV[6] the job id, ARGV[7] the caller,
# ARGV[8..] the datasets' ids; KEYS[3], KEYS[4] the index and its owners, written when reserved.
_INPUTS_LUA = (
    LAPSE_LUA
    + _RESERVE
    + """
local ok, used = reserve(8)
if ok == 1 then
  redis.call('ZADD', KEYS[3], now, ARGV[6])
  redis.call('HSET', KEYS[4], ARGV[6], ARGV[7])
end
return {ok, used}
"""
)

# KEYS[1], KEYS[2] the index and its owners; ARGV[1] job id, ARGV[2] STORAGE_PREFIX, ARGV[3] the
# job's token. Gives the reservation back (its owner's keys are named from the index, as the job
# records' scripts name an owner's keys: one Redis server) and drops it from the index; returns 1
# when there was one.
_RELEASE_LUA = """
local owner = redis.call('HGET', KEYS[2], ARGV[1])
if owner then
  redis.call('ZREM', ARGV[2] .. owner, ARGV[3])
  redis.call('HDEL', ARGV[2] .. owner .. ':amounts', ARGV[3])
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if owner then return 1 end
return 0
"""

# KEYS[1] the index; ARGV[1] ms: the job ids reserved at least that long ago (Redis' clock).
_STALE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
"""


def held(name: str) -> list[str]:
    """The two keys of what is held under ``name``: a zset of tokens by expiry, a hash of amounts."""
    return [name, name + ":amounts"]


def storage_keys(caller: str) -> list[str]:
    """The keys of ``caller``'s storage reservations."""
    return held(STORAGE_PREFIX + caller)


def certificate_token(sha256: str) -> str:
    """The token under which a stored certificate is held."""
    return CERTIFICATE_TOKEN + sha256


# After LAPSE_LUA: hold ARGV[2] bytes under token ARGV[1] for ARGV[3] ms, whatever the quota (what
# is held is already on disk); returns the bytes now held.
_HOLD_LUA = (
    LAPSE_LUA + "hold(ARGV[1], ARGV[2], tonumber(ARGV[3]))\nreturn held + tonumber(ARGV[2])\n"
)


def hold_certificate(
    client: redis.Redis, caller: str, sha256: str, nbytes: int, ttl_ms: int
) -> None:
    """Count a stored certificate of ``caller`` (``nbytes`` on disk) against its storage quota for
    ``ttl_ms``, the certificate's retention. It is held even past the quota (the job it certifies
    was admitted, and the file is written); the account's next upload or job is then refused until
    something lapses or is deleted. Idempotent per certificate."""
    client.eval(_HOLD_LUA, 2, *storage_keys(caller), certificate_token(sha256), nbytes, ttl_ms)


def release_certificate(client: redis.Redis, caller: str, sha256: str) -> None:
    """Stop counting a deleted certificate of ``caller``."""
    zset, amounts = storage_keys(caller)
    with client.pipeline() as pipe:
        pipe.zrem(zset, certificate_token(sha256))
        pipe.hdel(amounts, certificate_token(sha256))
        pipe.execute()


def inputs_token(job_id: str) -> str:
    """The token under which a job's inputs are reserved."""
    return INPUTS_TOKEN + job_id


def inputs_ttl_ms(job_ttl_s: int, grace_s: float) -> int:
    """How long an inputs reservation lasts unless given back: past its job record's life and the
    sweep's grace, so that it lapses only once the sweep has had its turn."""
    return int((job_ttl_s + 2 * grace_s) * 1000)


def inputs_disk_bytes(x: np.ndarray, data_dir: Path) -> int:
    """What a job's inputs take on disk once saved, as a dataset is counted
    (:func:`~smoothcert.service.core.dataset_store.disk_bytes`): ``inputs.npy`` and its folder, in
    whole blocks of the file system holding ``data_dir``."""
    return disk_bytes([npy_bytes(x)], block_size(data_dir))


def npy_bytes(x: np.ndarray) -> int:
    """The size of the ``.npy`` file ``np.save`` writes for ``x`` (a version 1.0 header, as numpy
    writes for any array whose header fits 64 KiB, and its bytes)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(x))
    return len(header.getvalue()) + x.nbytes


class JobInputs:
    """The reservations of job inputs on one Redis."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._reserve = client.register_script(_INPUTS_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._stale = client.register_script(_STALE_LUA)

    def reserve(
        self,
        owner: str,
        job_id: str,
        nbytes: int,
        *,
        quota: int,
        stored: int,
        dataset_ids: list[str],
        ttl_ms: int,
    ) -> tuple[bool, int]:
        """Reserve ``nbytes`` for ``job_id``'s inputs against ``owner``'s ``quota``, beside its
        stored datasets (``stored`` bytes, ``dataset_ids``); whether they fit (and are now
        reserved), and the bytes the owner used before."""
        args: list[str | int] = [inputs_token(job_id), nbytes, quota, stored, ttl_ms, job_id, owner]
        args += dataset_ids
        keys = [*storage_keys(owner), INPUTS_INDEX, INPUTS_OWNERS]
        ok, used = self._reserve(keys=keys, args=args)
        return bool(ok), int(used)

    def release(self, job_id: str) -> bool:
        """Give back what ``job_id``'s inputs hold; whether anything was held."""
        keys = [INPUTS_INDEX, INPUTS_OWNERS]
        return bool(self._release(keys=keys, args=[job_id, STORAGE_PREFIX, inputs_token(job_id)]))

    def older_than(self, age_s: float) -> list[str]:
        """The jobs whose inputs were reserved at least ``age_s`` seconds ago."""
        return [_text(j) for j in self._stale(keys=[INPUTS_INDEX], args=[int(age_s * 1000)])]

    def reserved(self) -> set[str]:
        """Every job with an inputs reservation."""
        members: list[bytes] = self.redis.zrange(INPUTS_INDEX, 0, -1)  # type: ignore[assignment]
        return {_text(j) for j in members}


def drop_job_inputs(client: redis.Redis, jobs_dir: Path, job_id: str) -> None:
    """Delete ``DATA_DIR/jobs/<id>`` (never a folder that resolves elsewhere: that is left alone),
    then give back its reservation; RedisError when that could not be done (the sweep does it
    later)."""
    try:
        shutil.rmtree(job_folder(jobs_dir, job_id), ignore_errors=True)
    except ValueError:
        log.warning("job %s: its folder resolves outside %s; left alone", job_id, jobs_dir)
    JobInputs(client).release(job_id)


def sweep_interval_s(grace_s: float) -> float:
    """How often the workers sweep, together: often enough that inputs go soon after their grace."""
    return min(60.0, max(1.0, grace_s / 2))


def sweep_orphan_inputs(
    client: redis.Redis, jobs_dir: Path, *, grace_s: float, job_ttl_s: int
) -> list[str]:
    """Delete the inputs of jobs whose record is missing or ended, reserved more than ``grace_s``
    ago, and give their reservations back; likewise folders that no reservation names, once older
    than ``job_ttl_s``. Does nothing when another process swept less than
    :func:`sweep_interval_s` ago. The job ids whose folders it deleted or released."""
    lock_ms = int(sweep_interval_s(grace_s) * 1000)
    if not client.set(SWEEP_LOCK, os.getpid(), nx=True, px=lock_ms):
        return []
    inputs, swept = JobInputs(client), []
    for job_id in inputs.older_than(grace_s):
        if _ended(client, job_id):
            drop_job_inputs(client, jobs_dir, job_id)
            swept.append(job_id)
    if jobs_dir.is_dir():
        reserved, cutoff = inputs.reserved(), time.time() - job_ttl_s
        for entry in os.scandir(jobs_dir):
            name = entry.name
            if not is_job_id(name) or name in reserved or name in swept:
                continue
            try:
                old = entry.stat(follow_symlinks=False).st_mtime < cutoff
            except OSError:
                continue
            if old and _ended(client, name):
                drop_job_inputs(client, jobs_dir, name)
                swept.append(name)
    if swept:
        log.info("deleted the inputs of %d ended or unknown jobs: %s", len(swept), swept[:20])
    return swept


def _ended(client: redis.Redis, job_id: str) -> bool:
    """Whether job ``job_id``'s record is missing or in a final state."""
    status = client.hget(JOB_PREFIX + job_id, "status")
    return status is None or _text(status) in TERMINAL


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
