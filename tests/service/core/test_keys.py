"""API keys: their format and checksum, and the store (on the session's Redis)."""

from __future__ import annotations

import time

import pytest

from smoothcert.service.core import keys
from smoothcert.service.core.keys import KeyStore
from tests.support.stack import scratch_db


def test_a_key_has_its_prefix_id_secret_and_checksum():
    key_id, key = keys.new_key()
    assert key.startswith(f"sck_{key_id}_") and len(key) == 4 + 12 + 1 + 43 + 6
    assert keys.parse(key) == key_id
    assert keys.is_key_format(key)


def test_a_typo_or_a_cut_fails_the_checksum():
    _, key = keys.new_key()
    i = 20
    typo = key[:i] + ("A" if key[i] != "A" else "B") + key[i + 1 :]
    assert keys.parse(typo) is None
    assert keys.parse(key[:-1]) is None
    assert keys.parse(key + "x") is None
    assert keys.parse("sck_" + "a" * 62) is None


def test_scopes_are_checked_and_ordered():
    assert keys.normal_scopes(["train", "certify", "train"]) == ("certify", "train")
    with pytest.raises(ValueError, match="unknown scopes"):
        keys.normal_scopes(["root"])
    with pytest.raises(ValueError, match="at least one scope"):
        keys.normal_scopes([])


@pytest.mark.parametrize("name", ["alice", "ci-bot_2", "a"])
def test_account_names(name):
    assert keys.valid_account(name)


@pytest.mark.parametrize("name", ["", "Alice", "1st", "a b", "a" * 64, "0123456789abcdef" * 2])
def test_bad_account_names(name):
    assert not keys.valid_account(name)


KEYS_DB = 13  # a scratch database of the session's Redis (emptied before and after)


@pytest.fixture
def store(redis_url):
    with scratch_db(redis_url, KEYS_DB) as client:
        yield KeyStore(client, "pepper-for-tests")


def test_create_lookup_list_revoke(store):
    record, key = store.create("alice", ["certify"], name="ci", expires_in_s=60)
    assert record.account == "alice" and record.scopes == ("certify",) and record.name == "ci"
    key_id = keys.parse(key)
    assert key_id == record.id and store.lookup(key_id, key) == record
    assert store.lookup(key_id, key[:-6] + keys.checksum(key[:-6])) == record
    other_id, other = keys.new_key()
    assert store.lookup(record.id, other) is None  # another secret under this id
    assert [r.id for r in store.list("alice")] == [record.id] and store.list("bob") == []
    assert store.list() == [record]
    assert store.revoke(record.id) == record
    assert (
        store.lookup(key_id, key) is None and store.list() == [] and store.revoke(record.id) is None
    )


def test_the_secret_is_not_stored(store):
    _, key = store.create("alice", ["certify", "models"])
    secret = key[len("sck_") + 13 : -6]
    for name in store.redis.keys("*"):
        assert secret.encode() not in name
        kind = store.redis.type(name)
        values = (
            store.redis.hgetall(name).items()
            if kind == b"hash"
            else store.redis.zrange(name, 0, -1, withscores=False)
        )
        assert key.encode() not in repr(list(values)).encode()
        assert secret not in repr(list(values))


def test_expiry(store):
    record, _ = store.create("alice", ["certify"], expires_in_s=1)
    assert not record.expired(time.time()) and record.expired(time.time() + 1.01)
    assert record.public()["expires_time"].endswith("Z")
    assert store.create("alice", ["certify"])[0].public()["expires_time"] is None
