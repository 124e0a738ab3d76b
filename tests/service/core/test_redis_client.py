"""The settings of a Sentinel deployment and what every client builds from them (no server here:
tests/cluster kills primaries under a real deployment)."""

from __future__ import annotations

import pytest
import redis
from pydantic import ValidationError
from redis.sentinel import SentinelConnectionPool

from smoothcert.service.core.queue import (
    WorkerSentinelTransport,
    WorkerTransport,
    make_celery,
    worker_transport,
)
from smoothcert.service.core.redis_client import celery_broker, confirm_replicated, connect
from smoothcert.service.core.settings import Settings

SENTINELS = "s1:26379, s2:26380,[::1]:26381"


def sentinel_settings(**extra) -> Settings:
    return Settings(
        redis_sentinels=SENTINELS,
        redis_password="p@ss:w/rd",
        redis_sentinel_password="sentinel-secret",
        **extra,
    )


def test_sentinels_are_a_comma_list_of_host_port():
    assert sentinel_settings().sentinels == [("s1", 26379), ("s2", 26380), ("::1", 26381)]
    assert Settings().sentinels == []


@pytest.mark.parametrize("value", ["s1", "s1:", ":26379", "s1:port", "s1:70000", " , "])
def test_a_malformed_sentinel_list_is_refused_with_its_entry(value):
    with pytest.raises(ValidationError, match="SMOOTHCERT_REDIS_SENTINELS"):
        Settings(redis_sentinels=value)


def test_a_url_and_sentinels_together_are_refused():
    with pytest.raises(ValidationError, match="set only one of them"):
        Settings(redis_url="redis://r:6379/0", redis_sentinels="s1:26379")


def test_production_needs_the_redis_password_with_sentinels_too():
    keys = {"api_key": "k" * 32, "admin_key": "a" * 32, "key_pepper": "p" * 32}
    with pytest.raises(ValidationError, match="SMOOTHCERT_REDIS_PASSWORD"):
        Settings(env="production", redis_sentinels="s1:26379", **keys)


def test_celery_gets_kombus_sentinel_urls_and_transport_options():
    url, options = celery_broker(sentinel_settings())
    assert url == (
        "sentinel://:p%40ss%3Aw%2Frd@s1:26379/0;sentinel://:p%40ss%3Aw%2Frd@s2:26380/0;"
        "sentinel://:p%40ss%3Aw%2Frd@[::1]:26381/0"
    )
    assert options["master_name"] == "smoothcert"
    assert options["sentinel_kwargs"]["password"] == "sentinel-secret"
    app = make_celery(sentinel_settings(redis_master_name="cluster-a"))
    transport = app.conf.broker_transport_options
    assert transport["master_name"] == "cluster-a" and transport["visibility_timeout"] > 0
    assert app.conf.broker_url.startswith("sentinel://")
    assert worker_transport(sentinel_settings()) is WorkerSentinelTransport
    assert worker_transport(Settings()) is WorkerTransport


def test_without_sentinels_everything_is_the_one_url():
    settings = Settings(redis_url="redis://r:6379/3", redis_password="pw")
    assert celery_broker(settings) == ("redis://:pw@r:6379/3", {})
    client = connect(settings)
    assert client.connection_pool.connection_kwargs["db"] == 3
    assert "master_name" not in make_celery(settings).conf.broker_transport_options
    assert confirm_replicated(client, settings) == 0  # nothing to wait for, nothing sent


def test_with_sentinels_the_client_asks_them_for_the_primary():
    settings = sentinel_settings()
    client = connect(settings, connect_timeout_s=1, timeout_s=3)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "smoothcert"
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380, 26381]
    assert all(
        s.connection_pool.connection_kwargs["password"] == "sentinel-secret" for s in sentinels
    )
    assert pool.connection_kwargs["password"] == "p@ss:w/rd"
    assert isinstance(client, redis.Redis)
