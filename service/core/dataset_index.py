"""DatasetIndex: the uploaded datasets as Redis indexes, so that neither the storage quota nor the
listing reads every dataset's record.

Keys (one Redis server, as the job records' indexes)::

    smoothcert:datasets:index                 zset, every score 0: one entry per stored dataset,
                                              "<created_at ms, 15 digits>:<id>", so that text order
                                              is time order (GET /v1/datasets pages through it)
    smoothcert:owner:<account>:dataset-index  zset, the same entries for the account's datasets
                                              (what GET /v1/datasets pages through for it)
    smoothcert:owner:<account>:datasets       hash: dataset id -> bytes it takes on disk, the
                                              account's datasets (its storage quota)
    smoothcert:owner:<account>:dataset-uploads zset: dataset id -> when it lapses (Redis clock,
                                              ms), the account's uploads in progress
    smoothcert:datasets:indexed:v2            set once the indexes hold every dataset on disk

A dataset record without an owner (uploaded before ownership was recorded) is indexed as the
``default`` account's.

An upload claims a place among its key's datasets (:meth:`DatasetIndex.claim`, one script: the
stored datasets plus the uploads in progress against ``SMOOTHCERT_MAX_DATASETS_PER_KEY``) before it
writes anything, and turns the claim into its entries in one transaction once its record is written
(:meth:`DatasetIndex.add`); a claim whose upload fails is given back, and one whose API died lapses
after ``UPLOAD_TTL_MS``. A delete drops the entries before the files, so a crash in between leaves
a dataset that counts nowhere rather than a count nobody can delete.

Datasets stored before the index was kept, or a Redis that lost its data (the marker key is gone
with it), are indexed from the records on disk, once, by the first call that needs the index
(:meth:`DatasetIndex.ensure`). An operator who removes dataset folders by hand deletes
``smoothcert:datasets:indexed:v2`` to have the indexes rebuilt (and the stale entries dropped).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis

from smoothcert.service.core.keys import account_of

LISTING = "smoothcert:datasets:index"
# v2: the per-account listings were added; a store indexed before gets them on its next start.
INDEXED = "smoothcert:datasets:indexed:v2"
OWNER_PREFIX = "smoothcert:owner:"
UPLOAD_TTL_MS = 600_000  # longer than writing the largest dataset takes

_ENTRY = re.compile(r"^[0-9]{15}:[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# KEYS[1] the owner's datasets (hash), KEYS[2] its uploads in progress (zset); ARGV[1] dataset id,
# ARGV[2] the most datasets the owner may have, ARGV[3] ttl ms. Returns {1 when claimed, the
# datasets stored or in progress before this one}.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local count = redis.call('HLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
if count >= tonumber(ARGV[2]) then return {0, count} end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
return {1, count}
"""


def owner_datasets_key(owner: str) -> str:
    """The hash of ``owner``'s datasets: id -> bytes on disk."""
    return f"{OWNER_PREFIX}{owner}:datasets"


def owner_listing_key(owner: str) -> str:
    """The listing of ``owner``'s datasets: entries as in the listing of all."""
    return f"{OWNER_PREFIX}{owner}:dataset-index"


def _owner(record: Mapping[str, Any]) -> str:
    return account_of(record.get("owner"))


def owner_uploads_key(owner: str) -> str:
    """The zset of ``owner``'s dataset uploads in progress: id -> when the claim lapses."""
    return f"{OWNER_PREFIX}{owner}:dataset-uploads"


def listing_entry(record: Mapping[str, Any]) -> str:
    """A dataset's member of the listing: creation time in ms, zero-padded, and its id."""
    return f"{round(float(record.get('created_at') or 0) * 1000):015d}:{record['id']}"


def is_listing_entry(value: str) -> bool:
    """Whether ``value`` has the form of a :func:`listing_entry` (a page cursor must)."""
    return _ENTRY.match(value) is not None


class DatasetIndex:
    """The datasets' indexes on one Redis; ``records()`` yields every record on disk with the bytes
    it takes there (for :meth:`ensure`)."""

    def __init__(
        self, client: redis.Redis, records: Callable[[], Iterable[tuple[dict[str, Any], int]]]
    ):
        self.redis, self.records = client, records
        self._claim = client.register_script(_CLAIM)

    def ensure(self) -> None:
        """Index every dataset on disk unless the indexes are known to hold them all."""
        if self.redis.exists(INDEXED):
            return
        with self.redis.pipeline(transaction=False) as pipe:
            for record, disk_bytes in self.records():
                entry = {listing_entry(record): 0}
                pipe.zadd(LISTING, entry)
                pipe.zadd(owner_listing_key(_owner(record)), entry)
                pipe.hset(owner_datasets_key(_owner(record)), record["id"], disk_bytes)
            pipe.set(INDEXED, 1)
            pipe.execute()

    def claim(self, owner: str, dataset_id: str, most: int) -> tuple[bool, int]:
        """Claim a place for ``owner``'s upload ``dataset_id`` among at most ``most`` datasets;
        whether it was free, and how many the owner has stored or in progress."""
        self.ensure()
        keys = [owner_datasets_key(owner), owner_uploads_key(owner)]
        ok, count = self._claim(keys=keys, args=[dataset_id, most, UPLOAD_TTL_MS])
        return bool(ok), int(count)

    def give_back(self, owner: str, dataset_id: str) -> None:
        """Drop the claim of an upload that failed."""
        self.redis.zrem(owner_uploads_key(owner), dataset_id)

    def add(self, record: Mapping[str, Any], disk_bytes: int) -> None:
        """Index a dataset whose record was just written; its owner's claim becomes its entry."""
        self.ensure()
        owner, entry = _owner(record), {listing_entry(record): 0}
        with self.redis.pipeline() as pipe:
            pipe.zadd(LISTING, entry)
            pipe.zadd(owner_listing_key(owner), entry)
            pipe.hset(owner_datasets_key(owner), record["id"], disk_bytes)
            pipe.zrem(owner_uploads_key(owner), record["id"])
            pipe.execute()

    def remove(self, record: Mapping[str, Any]) -> None:
        """Drop a dataset that is being deleted from the indexes."""
        owner = _owner(record)
        with self.redis.pipeline() as pipe:
            pipe.zrem(LISTING, listing_entry(record))
            pipe.zrem(owner_listing_key(owner), listing_entry(record))
            pipe.hdel(owner_datasets_key(owner), record["id"])
            pipe.execute()

    def stored(self, owner: str) -> tuple[int, list[str]]:
        """The bytes ``owner``'s datasets take on disk, and their ids."""
        self.ensure()
        held = self.redis.hgetall(owner_datasets_key(owner))
        return sum(int(v) for v in held.values()), sorted(_text(k) for k in held)

    def page(
        self, after: str | None, limit: int, owner: str | None = None
    ) -> tuple[list[str], str | None]:
        """Up to ``limit`` entries, newest first, of every dataset or of ``owner``'s, after the
        entry ``after`` (a previous page's cursor); and the last of them when more follow (the next
        page's cursor), else None."""
        self.ensure()
        index = LISTING if owner is None else owner_listing_key(owner)
        start = "+" if after is None else "(" + after
        entries = [_text(e) for e in self.redis.zrevrangebylex(index, start, "-", 0, limit + 1)]
        return entries[:limit], entries[limit - 1] if len(entries) > limit else None

    def drop_entries(self, entries: list[str], owner: str | None = None) -> None:
        """Drop listing entries whose record is gone (removed by hand)."""
        if entries:
            self.redis.zrem(LISTING, *entries)
            if owner is not None:
                self.redis.zrem(owner_listing_key(owner), *entries)


def entry_id(entry: str) -> str:
    """The dataset id of a listing entry."""
    return entry.split(":", 1)[1]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
