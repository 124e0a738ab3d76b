"""Who owns a record: the account names jobs, datasets and models carry, and the names they had
before accounts (torch-free; the API and the worker use it).

Every job record, dataset record and model record made by a request keeps the requesting key's
account in ``owner``. Two kinds of older records exist:

- records without ``owner`` (written before ownership was recorded): they belong to
  ``default`` (:func:`~smoothcert.service.core.keys.account_of`); such a model is public
  (:func:`~smoothcert.service.core.model_store.visibility`), as every model was usable by every key then;
- records of the first release with keys, whose ``owner`` is :func:`legacy_owner_id` of the
  bootstrap key that made them (the user key, SMOOTHCERT_API_KEY, or the admin key). The API
  renames them to ``default`` and ``admin`` when it starts (:func:`migrate_legacy_owners`), with
  the Redis keys named after them (job indexes, active jobs, dataset quota entries, storage
  reservations). A legacy id of a key that is no longer configured cannot be told apart from any
  other name: such records stay as they are, visible to the admin only.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from smoothcert.service.core.dataset_index import (
    owner_datasets_key,
    owner_listing_key,
    owner_uploads_key,
)
from smoothcert.service.core.jobs import PREFIX as JOB_PREFIX
from smoothcert.service.core.jobs import owner_index_key, owner_key
from smoothcert.service.core.keys import ADMIN_ACCOUNT, DEFAULT_ACCOUNT
from smoothcert.service.core.storage_quota import INPUTS_OWNERS, STORAGE_PREFIX, held

log = logging.getLogger(__name__)

MIGRATION_LOCK = "smoothcert:migrations:owners:lock"


def legacy_owner_id(key: str) -> str:
    """The owner name a bootstrap key gave its records in the first release with keys."""
    return hashlib.sha256(b"smoothcert-caller:" + key.encode()).hexdigest()[:32]


def legacy_names(api_key: str, admin_key: str) -> dict[str, str]:
    """Legacy owner name -> account, for the configured bootstrap keys (the admin key wins where
    both are the same key, as in development)."""
    names = {}
    if api_key:
        names[legacy_owner_id(api_key)] = DEFAULT_ACCOUNT
    if admin_key:
        names[legacy_owner_id(admin_key)] = ADMIN_ACCOUNT
    return names


# KEYS[1] a zset or hash to fold into KEYS[2] (same type), then deleted. Members already in KEYS[2]
# keep their value there. Returns how many members moved.
_FOLD = """
local kind = redis.call('TYPE', KEYS[1])['ok']
local moved = 0
if kind == 'zset' then
  local items = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  for i = 1, #items, 2 do moved = moved + redis.call('ZADD', KEYS[2], 'NX', items[i + 1], items[i]) end
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 and redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
elseif kind == 'hash' then
  local items = redis.call('HGETALL', KEYS[1])
  for i = 1, #items, 2 do moved = moved + redis.call('HSETNX', KEYS[2], items[i], items[i + 1]) end
end
redis.call('DEL', KEYS[1])
return moved
"""

# KEYS[1] a hash; ARGV[1] field, ARGV[2] old value, ARGV[3] new value. Sets the field only where it
# holds the old value (a job record that expired meanwhile is not brought back).
_RENAME_FIELD = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""


def migrate_legacy_owners(
    client: redis.Redis,
    names: Mapping[str, str],
    dataset_records: Iterable[dict[str, Any]],
    write_dataset: Any,
) -> dict[str, int]:
    """Rename legacy owner names to their accounts: job records and their indexes, the active-job
    sets, the dataset records (``dataset_records`` yields them, ``write_dataset(id, record)``
    writes one back) and their quota entries, and the storage reservations. Idempotent; one API
    process does it at a time (a lock), and what a crash leaves half done the next start finishes.
    Returns counts of what moved."""
    if not names or not client.set(MIGRATION_LOCK, 1, nx=True, ex=300):
        return {}
    fold, rename = client.register_script(_FOLD), client.register_script(_RENAME_FIELD)
    moved = {"jobs": 0, "datasets": 0, "reservations": 0}
    try:
        for record in dataset_records:  # records first: an index entry follows its record
            account = names.get(record.get("owner") or "")
            if account is not None:
                write_dataset(record["id"], {**record, "owner": account})
                moved["datasets"] += 1
        for legacy, account in names.items():
            for entry in client.zrange(owner_index_key(legacy), 0, -1):
                job_id = _text(entry).rpartition(":")[2]
                moved["jobs"] += rename(keys=[JOB_PREFIX + job_id], args=["owner", legacy, account])
            for old, new in (
                (owner_index_key(legacy), owner_index_key(account)),
                (owner_key(legacy), owner_key(account)),
                (owner_datasets_key(legacy), owner_datasets_key(account)),
                (owner_uploads_key(legacy), owner_uploads_key(account)),
                (owner_listing_key(legacy), owner_listing_key(account)),
                *zip(held(STORAGE_PREFIX + legacy), held(STORAGE_PREFIX + account), strict=True),
            ):
                fold(keys=[old, new])
            for field, owner in client.hgetall(INPUTS_OWNERS).items():
                if _text(owner) == legacy:
                    moved["reservations"] += rename(
                        keys=[INPUTS_OWNERS], args=[_text(field), legacy, account]
                    )
    finally:
        client.delete(MIGRATION_LOCK)
    if any(moved.values()):
        log.info("renamed legacy owners to accounts: %s", moved)
    return moved


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
