"""The compose profile `ha` (Redis with Sentinel) of docker/docker-compose.yml, without containers.

The profile's services start only with ``--profile ha``, so ``make deploy-up`` runs what it ran
before; the two servers keep the single Redis's budget, password and append-only file; the three
sentinels monitor redis-primary with quorum 2. docker/sentinel.sh's configuration is run for real:
a sentinel (the suite's Redis binary) started from it monitors a real primary whose password holds
quotes and backslashes, and asks a password of its own.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time

import pytest
import redis

from smoothcert.service.core.settings import Settings
from smoothcert.service.devstack.redis_server import RedisServer, find_server_binary, free_port
from tests.deploy.test_compose import DOCKER, env_file, interpolate, load_compose

HA = ("redis-primary", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3")
SENTINEL_SCRIPT = DOCKER / "sentinel.sh"


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return env_file(DOCKER / ".env.example")


def command(service: dict, env: dict[str, str]) -> list[str]:
    return [interpolate(part, env) for part in service["command"]]


def test_the_profile_starts_only_when_asked(compose):
    services = compose["services"]
    for name in HA:
        assert services[name]["profiles"] == ["ha"], name
    for name in ("redis", "api", "worker"):  # `make deploy-up` starts what it started before
        assert "profiles" not in services[name], name
    assert "ha" not in str(services["trainer"]["profiles"])


def test_both_servers_keep_the_single_redis_budget_password_and_file(compose, env):
    single = command(compose["services"]["redis"], env)
    for name in ("redis-primary", "redis-replica"):
        service = compose["services"][name]
        args = command(service, env)
        for option in ("--appendonly", "--maxmemory", "--maxmemory-policy", "--requirepass"):
            assert args[args.index(option) + 1] == single[single.index(option) + 1], (name, option)
        # the same password to log in to the other server, which a failover makes the primary
        assert args[args.index("--masterauth") + 1] == env["SMOOTHCERT_REDIS_PASSWORD"]
        assert args[args.index("--replica-announce-ip") + 1] == name  # a name clients resolve
        assert service["volumes"] == [f"{name}:/data"] and "ports" not in service
    replica = command(compose["services"]["redis-replica"], env)
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis-primary", "6379"]
    assert {"redis-primary", "redis-replica"} <= set(compose["volumes"])


def test_three_sentinels_each_announcing_its_own_name(compose, env):
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        service = compose["services"][name]
        assert service["command"] == ["sh", "/etc/smoothcert/sentinel.sh"]
        assert service["configs"] == [
            {"source": "sentinel-script", "target": "/etc/smoothcert/sentinel.sh"}
        ]
        assert "volumes" not in service  # no bind mount: the script comes as a compose config
        values = {k: interpolate(v, env) for k, v in service["environment"].items()}
        assert values["ANNOUNCE"] == name
        assert values["MASTER_NAME"] == env["SMOOTHCERT_REDIS_MASTER_NAME"]
        assert values["REDIS_PASSWORD"] == env["SMOOTHCERT_REDIS_PASSWORD"]
        assert "ports" not in service
    assert (DOCKER / compose["configs"]["sentinel-script"]["file"]).resolve() == SENTINEL_SCRIPT
    assert SENTINEL_SCRIPT.is_file()


def test_the_env_example_switches_to_the_sentinels_by_two_lines(env):
    values = {k.removeprefix("SMOOTHCERT_").lower(): v for k, v in env.items()}
    values.update(env="development", redis_url="")
    values["redis_sentinels"] = "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379"
    settings = Settings(**values)
    assert settings.sentinels == [
        ("sentinel-1", 26379),
        ("sentinel-2", 26379),
        ("sentinel-3", 26379),
    ]
    assert settings.redis_master_name == "smoothcert" and settings.redis_wait_replicas == 1


@pytest.mark.process
def test_a_sentinel_from_the_script_watches_a_primary_with_its_password(tmp_path):
    password, sentinel_password = 'p"w\\ord with spaces', 's"entinel\\secret'
    primary = RedisServer(tmp_path / "primary", persist=False, password=password).start()
    port = free_port()
    # redis-server, as the script calls it: the suite's binary, on loopback ports instead of the
    # compose network's names (the configuration is otherwise the script's own)
    shim = tmp_path / "bin" / "redis-server"
    shim.parent.mkdir()
    shim.write_text(
        "#!/bin/sh\n"
        f'sed -i -e "s/redis-primary 6379/127.0.0.1 {primary.port}/" '
        f'-e "s/^port 26379/port {port}/" -e "s/announce-ip .*/announce-ip 127.0.0.1/" "$1"\n'
        f'exec {find_server_binary()} "$@"\n'
    )
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    conf = tmp_path / "sentinel" / "sentinel.conf"
    conf.parent.mkdir()
    proc = subprocess.Popen(
        ["sh", str(SENTINEL_SCRIPT)],
        env={
            **os.environ,
            "PATH": f"{shim.parent}:{os.environ['PATH']}",
            "SENTINEL_CONF": str(conf),
            "MASTER_NAME": "smoothcert",
            "REDIS_PASSWORD": password,
            "SENTINEL_PASSWORD": sentinel_password,
            "ANNOUNCE": "sentinel-1",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        text = conf.read_text() if _wait(conf.exists) else ""
        assert "sentinel down-after-milliseconds smoothcert 5000" in text
        assert "sentinel failover-timeout smoothcert 60000" in text
        sentinel = redis.Redis(port=port, password=sentinel_password, socket_timeout=2)
        run_id = primary_client(primary).info("server")["run_id"]
        # the sentinel logged in to the primary (auth-pass) and read its INFO
        assert _wait(lambda: sentinel.sentinel_master("smoothcert").get("runid") == run_id)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password="wrong", socket_timeout=2).ping()
    finally:
        proc.terminate()
        proc.wait(10)
        primary.stop()


def primary_client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=2)


def _wait(check, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.1)
    return False
