"""``smoothcert up``: Redis, the API and one worker on this machine, with the demo model ready.

Starts (as subprocesses, logs under ``DATA_DIR/logs``, the API's and the worker's rotated past
``SMOOTHCERT_LOG_MAX_BYTES`` with ``SMOOTHCERT_LOG_BACKUPS`` older files) a Redis-protocol server
unless ``SMOOTHCERT_REDIS_URL`` or ``SMOOTHCERT_REDIS_SENTINELS`` is set (then the API and the
worker use that Redis, or the primary those sentinels name, and follow its failovers), the
API's server (:mod:`smoothcert.service.api.server`, uvicorn with deadlines on slow clients) on
``SMOOTHCERT_HOST:SMOOTHCERT_PORT`` and one Celery worker that consumes both queues
(certification and training); waits for ``/readyz``; uploads the digits demo model through the
API (reused when an identical one is already stored); prints the URL, the two keys and a curl
example; stops everything on Ctrl-C, SIGTERM or SIGHUP (its terminal closed), or when one of
the processes dies. The Redis it starts requires a password (``SMOOTHCERT_REDIS_PASSWORD``, or a
fresh random one), which reaches the API and the worker in their ``SMOOTHCERT_REDIS_URL``.

Keys, in development: the admin key (account ``admin``, every scope), the user key
(``SMOOTHCERT_API_KEY``: account ``default``, scope ``certify``) and the key pepper are
generated on the first start on a data dir, kept in ``DATA_DIR/credentials.env`` (mode 0600) and
reused on every later start (:mod:`~smoothcert.service.devstack.credentials`); a value set in
the environment wins. Every child gets the same three. In production they must be given.

A launcher that cannot stop them (killed with SIGKILL, or crashed) still takes them along: each
child gets SIGTERM from the kernel when the launcher exits (``processes.parent_death``), and the
orphan reaper (:mod:`~smoothcert.service.devstack.orphan_reaper`) finishes the job with the same
steps as :meth:`Stack.stop`, down to SIGKILL of each child's process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import numpy as np

from smoothcert.models.metadata import sha256_file
from smoothcert.service.core.queue import QUEUE, TRAIN_QUEUE
from smoothcert.service.core.settings import Settings
from smoothcert.service.core.store import private_data_dir
from smoothcert.service.devstack import credentials, processes
from smoothcert.service.devstack.commands import api_command, worker_command
from smoothcert.service.devstack.credentials import Credentials, CredentialsError
from smoothcert.service.devstack.orphan_reaper import OrphanReaper
from smoothcert.service.devstack.processes import Child, ChildDied
from smoothcert.service.devstack.redis_server import RedisServer

DEMO_NAME = "digits-demo"
# The worker's warm shutdown (SIGTERM) finishes its task; a cold one (SIGQUIT) abandons it.
_STOP_GRACE_S, _ESCALATE = 10.0, ((signal.SIGQUIT, 5.0),)
_REDIS_STOP_S = 10.0
# The ways a person stops the launcher: Ctrl-C, `kill`, closing its terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def up_settings(environ: Mapping[str, str] | None = None) -> tuple[Settings, Credentials | None]:
    """The settings of ``smoothcert up``: in development with the keys of ``DATA_DIR/credentials.env``
    (written on the first start) under those of the environment, and where they came from; in
    production the settings as given (None). CredentialsError for a file that cannot be used."""
    settings = Settings()
    if settings.env == "production":
        return settings, None
    keys = credentials.load(settings.data_dir, os.environ if environ is None else environ)
    settings = Settings(api_key=keys.api_key, admin_key=keys.admin_key, key_pepper=keys.key_pepper)
    return settings, keys


class Stack:
    """The processes of a local deployment, started in order and stopped in reverse."""

    def __init__(self, settings: Settings, keys: Credentials | None = None):
        self.settings = settings
        self.keys = keys  # where the keys came from, in development (None: the settings gave them)
        self.logs = settings.data_dir / "logs"
        self.redis: RedisServer | None = None
        self.children: list[Child] = []
        self.reaper: OrphanReaper | None = None

    def env(self) -> dict[str, str]:
        """The environment every child shares, so they agree on keys, data and broker."""
        s = self.settings
        # With sentinels the children find the primary as this process does; else the one URL,
        # password in it.
        redis_env = (
            {
                "SMOOTHCERT_REDIS_URL": "",
                "SMOOTHCERT_REDIS_SENTINELS": s.redis_sentinels,
                "SMOOTHCERT_REDIS_MASTER_NAME": s.redis_master_name,
                "SMOOTHCERT_REDIS_PASSWORD": s.redis_password,
                "SMOOTHCERT_REDIS_SENTINEL_PASSWORD": s.redis_sentinel_password,
            }
            if s.redis_sentinels
            else {"SMOOTHCERT_REDIS_URL": s.broker_url}
        )
        return {
            **os.environ,
            "SMOOTHCERT_API_KEY": s.api_key,
            "SMOOTHCERT_ADMIN_KEY": s.admin_key,
            "SMOOTHCERT_KEY_PEPPER": s.key_pepper,
            "SMOOTHCERT_DATA_DIR": str(s.data_dir),
            **redis_env,
            "SMOOTHCERT_HOST": s.host,
            "SMOOTHCERT_PORT": str(s.port),
            "SMOOTHCERT_ENV": s.env,
        }

    def start(self) -> None:
        s = self.settings
        # Files 0600 and folders 0700 under the data dir, for Redis, the API and the worker too
        private_data_dir(s.data_dir)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.reaper = OrphanReaper(self.logs / "orphan_reaper.log")
        if not s.redis_url and not s.redis_sentinels:
            self.redis = RedisServer(
                s.data_dir / "redis",
                password=s.redis_password or None,
                maxmemory=s.redis_maxmemory,
                parent_death_signal=signal.SIGTERM,
            )
            self.redis.start()
            if self.redis.process is not None:
                self.reaper.watch(
                    "Redis", self.redis.process.pid, ((signal.SIGTERM, _REDIS_STOP_S),)
                )
            s.redis_url = self.redis.url
        _check_port_free(s.host, s.port)
        self._spawn("api", api_command(s.host, s.port))
        self._spawn(
            "worker",
            worker_command(
                "--queues", f"{QUEUE},{TRAIN_QUEUE}", "--hostname", f"smoothcert-{os.getpid()}@%h"
            ),
        )

    def _spawn(self, name: str, args: list[str]) -> None:
        log = self.logs / f"{name}.log"
        # SIGTERM when the launcher exits: a server of `up` has no reason to outlive it.
        # Rotated: a flood of requests or log lines fills at most (1 + backups) x max_bytes per log.
        rotation = processes.LogRotation(self.settings.log_max_bytes, self.settings.log_backups)
        proc = processes.spawn(
            args,
            self.env(),
            log,
            append=True,
            parent_death_signal=signal.SIGTERM,
            rotation=rotation,
        )
        self.children.append(Child(name, proc, log))
        if self.reaper is not None:
            self.reaper.watch(name, proc.pid, ((signal.SIGTERM, _STOP_GRACE_S), *_ESCALATE))

    def check_alive(self) -> None:
        """Raise ChildDied when a child has exited."""
        processes.check_alive(self.children)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Return once ``/readyz`` answers 200; raise ChildDied or TimeoutError."""
        try:
            processes.wait_until(
                lambda: httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200,
                timeout,
                "the stack",
                children=self.children,
                ignore=(httpx.HTTPError,),
                interval=0.3,
            )
        except processes.NotReady:
            raise TimeoutError(
                f"the stack was not ready within {timeout:.0f} s; logs in {self.logs}"
            ) from None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::") else self.settings.host
        return f"http://{host}:{self.settings.port}"

    def stop(self) -> None:
        """Worker first (warm, then cold, then killed), then the API, then Redis."""
        for child in reversed(self.children):
            processes.stop(child.proc, _STOP_GRACE_S, escalate=_ESCALATE)
        self.children.clear()
        if self.redis is not None:
            self.redis.stop(_REDIS_STOP_S)
        if self.reaper is not None:
            self.reaper.close()


def register_demo(stack: Stack) -> tuple[dict, Path]:
    """Upload the demo model (built once under ``DATA_DIR/demo``) unless the same is stored,
    public: the admin key uploads it and the user key's curl example certifies with it (a record
    without ``visibility`` is from before private models, which every key could use)."""
    demo_dir = stack.settings.data_dir / "demo"
    paths = {
        k: demo_dir / v
        for k, v in (
            ("safetensors", "digits_cnn.safetensors"),
            ("test_x", "digits_test_x.npy"),
            ("test_y", "digits_test_y.npy"),
        )
    }
    if not all(p.exists() for p in paths.values()):
        from smoothcert.models.demo import (
            build_demo,
        )  # torch, only in this process, only the first time

        paths = build_demo(demo_dir, seed=0)
    headers = {"Authorization": f"Bearer {stack.settings.admin_key}"}
    sha = sha256_file(paths["safetensors"])
    for model in httpx.get(f"{stack.url}/v1/models", headers=headers, timeout=10).json():
        if (
            model.get("name") == DEMO_NAME
            and model.get("sha256") == sha
            and model.get("visibility", "public") == "public"
        ):
            return model, paths["test_x"]
    with open(paths["safetensors"], "rb") as f:
        resp = httpx.post(
            f"{stack.url}/v1/models",
            headers=headers,
            timeout=stack.settings.model_check_timeout_s + 10,
            files={"file": (paths["safetensors"].name, f)},
            data={"name": DEMO_NAME, "visibility": "public"},
        )
    if resp.status_code != 201:
        raise RuntimeError(f"uploading the demo model failed: {resp.status_code} {resp.text}")
    return resp.json(), paths["test_x"]


def banner(stack: Stack, model: dict, test_x: Path) -> str:
    """What ``up`` prints: where the API is, the two keys, and a certify request to paste."""
    s = stack.settings
    image = np.load(test_x)[0].round(4).tolist()
    body = json.dumps(
        {"model_id": model["id"], "inputs": image, "sigma": 0.25, "n": 10000}, separators=(",", ":")
    )
    auth = f'-H "Authorization: Bearer {s.api_key}"'
    keys = stack.keys
    key_lines = credentials.key_lines(
        s.api_key,
        s.admin_key,
        keys.from_env if keys is not None else credentials.NAMES,  # None: production's settings
        f"{keys.path if keys is not None else ''} (mode 0600)",
        "of `smoothcert up`; delete the file for new ones",
    )
    return "\n".join(
        [
            f"smoothcert is up at {stack.url}  (docs: {stack.url}/docs, logs: {stack.logs})",
            f"web page: open {stack.url}/ in a browser and paste the API key",
            f"manual: {stack.url}/manual/getting-started/ (built by `make docs`)",
            *key_lines,
            f"demo model: {model['id']} ({model.get('name')}, input {model.get('input_shape')}, "
            f"{model.get('num_classes')} classes)",
            "",
            "certify one test digit:",
            f"  curl -s {auth} -H 'Content-Type: application/json' -d '{body}' {stack.url}/v1/certify",
            "then poll the job it names:",
            f"  curl -s {auth} {stack.url}/v1/jobs/JOB_ID",
            f"health and numbers (no key): {stack.url}/readyz  {stack.url}/metrics",
            "",
            "Ctrl-C stops everything.",
        ]
    )


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            raise ChildDied(
                f"{host}:{port} is in use; set SMOOTHCERT_PORT to another port"
            ) from None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _say(text: str) -> None:
    """Print to stderr, unless the terminal is gone (SIGHUP): the stopping must go on regardless."""
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the stack until Ctrl-C, SIGTERM or SIGHUP (exit 0) or a failure (exit 1, message on stderr)."""
    try:
        settings, keys = up_settings()
    except CredentialsError as exc:
        _say(f"smoothcert up: {exc}")
        return 1
    stack = Stack(settings, keys)
    # SIGINT too: Python raises KeyboardInterrupt for it only when it was not inherited ignored
    # (a launcher started in the background of a non-interactive shell inherits SIG_IGN).
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_interrupt)
    try:
        stack.start()
        stack.wait_ready()
        model, test_x = register_demo(stack)
        print(banner(stack, model, test_x), flush=True)
        while True:
            stack.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        _say("\nstopping ...")
        return 0
    except Exception as exc:  # noqa: BLE001 - one readable line for the operator, then clean up
        _say(f"smoothcert up: {exc}")
        return 1
    finally:
        # A second Ctrl-C (or the terminal closing now) must not cut the stopping short; it is
        # bounded by the stop steps.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
