"""The Redis that `smoothcert up` and the suite start requires a password: without it a client
gets nothing, can queue nothing, and the password shows in no process list."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import redis
from kombu.exceptions import OperationalError

from smoothcert.service.core.queue import CERTIFY_TASK, QUEUE, make_celery, queue_depth
from smoothcert.service.core.settings import Settings
from smoothcert.service.devstack.redis_server import RedisServer

pytestmark = pytest.mark.process


def without_password(url: str, password: str | None = None) -> str:
    parts = urlsplit(url)
    auth = f":{password}@" if password else ""
    return f"{parts.scheme}://{auth}{parts.hostname}:{parts.port}{parts.path}"


@pytest.mark.parametrize("password", [None, "wrong-password"])
def test_a_client_without_the_password_gets_nothing(redis_url, worker, password):
    # The session's Redis, which the session's API and worker use (with the password).
    assert redis.Redis.from_url(redis_url).ping()
    outsider = redis.Redis.from_url(without_password(redis_url, password), socket_timeout=5)
    for attempt in (
        outsider.ping,
        outsider.keys,
        lambda: outsider.hgetall("smoothcert:leases"),
        lambda: outsider.lpush(QUEUE, b"{}"),
        lambda: outsider.config_set("requirepass", ""),
    ):
        with pytest.raises(redis.AuthenticationError):
            attempt()
    sender = make_celery(Settings(redis_url=without_password(redis_url, password)))
    sender.conf.broker_connection_timeout = 2
    before = queue_depth(redis.Redis.from_url(redis_url), QUEUE)
    with pytest.raises((OperationalError, redis.AuthenticationError)):
        sender.send_task(CERTIFY_TASK, args=["x", {}], task_id="x")
    assert queue_depth(redis.Redis.from_url(redis_url), QUEUE) == before


def test_the_password_is_asked_for_and_never_on_a_command_line(tmp_path):
    with RedisServer(tmp_path / "redis", persist=False) as server:
        assert len(server.password) >= 32 and server.password in server.url
        assert redis.Redis.from_url(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()
        with open(f"/proc/{server.process.pid}/cmdline", "rb") as f:
            assert server.password.encode() not in f.read()
        assert server.process.args.count(server.password) == 0
    # A chosen password, quoted for the server's config and the URL alike.
    with RedisServer(tmp_path / "chosen", persist=False, password='pa ss"w\\ord/@') as server:
        assert redis.Redis.from_url(server.url).ping()
        assert redis.Redis(port=server.port, password='pa ss"w\\ord/@').ping()
