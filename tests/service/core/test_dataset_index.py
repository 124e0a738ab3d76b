"""The datasets' Redis index, on a real Redis: the storage quota and the listing read it, not every
record on disk; datasets stored without it are indexed once; claims count uploads in progress."""

from __future__ import annotations

import io

import numpy as np
import pytest

from smoothcert.service.core.dataset_index import INDEXED, LISTING, owner_datasets_key
from smoothcert.service.core.dataset_store import DatasetStore, TooManyDatasets, block_size
from tests.support.stack import scratch_db

DB = 11


def npz(rows: int) -> io.BytesIO:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((rows, 1, 8, 8), dtype=np.uint8), y=np.zeros(rows, dtype=np.int64))
    buf.seek(0)
    return buf


def add(store: DatasetStore, owner: str, rows: int = 1, most: int | None = None) -> dict:
    return store.add(
        npz(rows),
        "d.npz",
        None,
        max_bytes=1 << 20,
        max_unpacked_bytes=1 << 20,
        owner=owner,
        max_count=most,
    )


@pytest.fixture
def redis_db(redis_url):
    with scratch_db(redis_url, DB) as client:
        yield client


def test_the_quota_and_the_listing_read_the_index_not_every_record(redis_db, tmp_path, monkeypatch):
    store = DatasetStore(tmp_path, redis_db)
    mine = [add(store, "alice") for _ in range(3)]
    for _ in range(5):
        add(store, "bob")
    block = block_size(tmp_path)
    assert all(d["disk_bytes"] == 4 * block for d in mine)

    def every_record():
        raise AssertionError("read every dataset's record")

    monkeypatch.setattr(DatasetStore, "list", lambda self: every_record())
    assert store.stored_bytes("alice") == (12 * block, sorted(d["id"] for d in mine))
    read = []
    real_get = DatasetStore.get
    monkeypatch.setattr(DatasetStore, "get", lambda self, i: read.append(i) or real_get(self, i))
    page, cursor = store.page(None, 2)
    assert len(page) == 2 and len(read) == 2 and cursor is not None  # the page's records only

    assert store.delete(mine[0]["id"])
    assert store.stored_bytes("alice") == (8 * block, sorted(d["id"] for d in mine[1:]))
    assert redis_db.zcard(LISTING) == 7


def test_datasets_stored_without_the_index_are_indexed_once(redis_db, tmp_path):
    before = DatasetStore(tmp_path)  # a store without Redis, as before the index was kept
    old = [add(before, "alice") for _ in range(2)]
    record = before.read(old[0]["id"])
    del record["disk_bytes"]  # a record from before disk_bytes was recorded: measured on disk
    before.write(old[0]["id"], record)
    store = DatasetStore(tmp_path, redis_db)
    block = block_size(tmp_path)
    assert store.stored_bytes("alice") == (8 * block, sorted(d["id"] for d in old))
    assert redis_db.exists(INDEXED) and redis_db.zcard(LISTING) == 2
    # The marker gone (a Redis that lost its data): indexed again from disk.
    redis_db.delete(INDEXED, owner_datasets_key("alice"), LISTING)
    assert store.page(None, 10)[0] == sorted(store.list(), key=lambda d: -d["created_at"])
    assert store.stored_bytes("alice")[0] == 8 * block


def test_a_claim_counts_uploads_in_progress_and_a_refused_upload_gives_it_back(redis_db, tmp_path):
    store = DatasetStore(tmp_path, redis_db)
    assert store.index is not None
    assert store.index.claim("alice", "in-progress", 2) == (True, 0)
    add(store, "alice", most=2)
    with pytest.raises(TooManyDatasets, match="already has 2 datasets stored or being uploaded"):
        add(store, "alice", most=2)
    store.index.give_back("alice", "in-progress")
    add(store, "alice", most=2)
    with pytest.raises(ValueError):  # not a dataset: its claim is given back
        store.add(
            io.BytesIO(b"junk"),
            "j.npz",
            None,
            max_bytes=1 << 20,
            max_unpacked_bytes=1 << 20,
            owner="bob",
            max_count=1,
        )
    assert add(store, "bob", most=1)["owner"] == "bob"
    assert len(list(tmp_path.iterdir())) == 3
