"""The owners of records from the first release with keys (a hash of a bootstrap key) become their
accounts, on a real Redis and data dir: records, job and dataset indexes, quota entries and
storage reservations; a second run changes nothing; records without an owner read as default's."""

from __future__ import annotations

import io

import numpy as np
import pytest

from smoothcert.service.core.dataset_index import owner_datasets_key, owner_listing_key
from smoothcert.service.core.dataset_store import DatasetStore
from smoothcert.service.core.jobs import JobStore, active_jobs, new_job_id, owner_index_key
from smoothcert.service.core.keys import account_of
from smoothcert.service.core.model_store import visibility
from smoothcert.service.core.owners import (
    legacy_names,
    legacy_owner_id,
    migrate_legacy_owners,
)
from smoothcert.service.core.storage_quota import INPUTS_OWNERS, STORAGE_PREFIX
from tests.support.stack import scratch_db

USER, ADMIN = "legacy-user-key-0123456789", "legacy-admin-key-0123456789"


def npz() -> io.BytesIO:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((2, 1, 8, 8), np.uint8), y=np.zeros(2, np.int64))
    buf.seek(0)
    return buf


@pytest.fixture
def redis_db(redis_url):
    with scratch_db(redis_url, 14) as client:
        yield client


def test_legacy_owners_become_accounts_once(redis_db, tmp_path):
    user_old, admin_old = legacy_owner_id(USER), legacy_owner_id(ADMIN)
    names = legacy_names(USER, ADMIN)
    assert names == {user_old: "default", admin_old: "admin"}
    jobs, datasets = JobStore(redis_db, ttl_s=600), DatasetStore(tmp_path, redis_db)
    queued, done, admins = new_job_id(), new_job_id(), new_job_id()
    jobs.create(queued, "certify", {}, owner=user_old)
    jobs.create(done, "certify", {}, owner=user_old)
    jobs.start(done) and jobs.succeed(done, {"results": []})
    jobs.create(admins, "train", {}, owner=admin_old)
    kept = {"max_bytes": 1 << 20, "max_unpacked_bytes": 1 << 20}
    data = datasets.add(npz(), "d.npz", None, owner=user_old, max_count=5, **kept)
    other = datasets.add(npz(), "e.npz", None, owner="alice", max_count=5, **kept)
    redis_db.zadd(STORAGE_PREFIX + user_old, {"job:x": 10**15})
    redis_db.hset(STORAGE_PREFIX + user_old + ":amounts", "job:x", 4096)
    redis_db.hset(INPUTS_OWNERS, "x", user_old)
    assert active_jobs(redis_db, user_old) == 1

    moved = migrate_legacy_owners(redis_db, names, datasets.list(), datasets.write)
    assert moved == {"jobs": 3, "datasets": 1, "reservations": 1}

    assert [jobs.get(j).owner for j in (queued, done, admins)] == ["default", "default", "admin"]
    listed, _ = jobs.recent("default", limit=10)
    assert {r.id for r in listed} == {queued, done}
    assert active_jobs(redis_db, "default") == 1
    assert datasets.get(data["id"])["owner"] == "default"
    assert datasets.get(other["id"])["owner"] == "alice"  # not a legacy name: left alone
    page, _ = datasets.page(None, 10, "default")
    assert [d["id"] for d in page] == [data["id"]]
    assert datasets.stored_bytes("default")[1] == [data["id"]]
    assert redis_db.hget(STORAGE_PREFIX + "default:amounts", "job:x") == b"4096"
    assert redis_db.hget(INPUTS_OWNERS, "x") == b"default"
    for legacy in (user_old, admin_old):  # nothing is left under the old names
        for key in (
            owner_index_key(legacy),
            owner_datasets_key(legacy),
            owner_listing_key(legacy),
            STORAGE_PREFIX + legacy,
        ):
            assert not redis_db.exists(key), key

    again = migrate_legacy_owners(redis_db, names, datasets.list(), datasets.write)
    assert again == {"jobs": 0, "datasets": 0, "reservations": 0}


def test_records_without_an_owner_are_defaults_and_such_models_public():
    assert account_of(None) == account_of("") == "default" and account_of("bob") == "bob"
    assert visibility({"id": "m"}) == "public"  # from before ownership: every key used it
    assert visibility({"id": "m", "owner": "bob"}) == "private"
    assert visibility({"id": "m", "owner": "bob", "visibility": "public"}) == "public"


def test_the_migration_waits_for_no_one_and_skips_while_another_runs(redis_db, tmp_path):
    redis_db.set("smoothcert:migrations:owners:lock", 1)  # another API process is at it
    assert migrate_legacy_owners(redis_db, legacy_names(USER, ADMIN), [], lambda *a: None) == {}
