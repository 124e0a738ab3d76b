"""The real stack, once per session: a Redis-protocol server on a free port, one Celery worker
process and the API under uvicorn, reached over HTTP with httpx. Nothing starts unless a test
asks for it (no autouse fixtures), so the unit tests here run without servers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from smoothcert.service.core.jobs import TERMINAL
from smoothcert.service.core.settings import Settings
from smoothcert.service.core.workers import HEARTBEAT_PREFIX
from smoothcert.service.devstack import processes
from smoothcert.service.devstack.commands import api_command, worker_command
from smoothcert.service.devstack.redis_server import RedisServer, free_port
from smoothcert.worker.queue.context import WorkerContext

USER_KEY, ADMIN_KEY = "user-key-for-tests-0123456789", "admin-key-for-tests-0123456789"
# Small caps so that the 413 and "exceeds the cap" paths are cheap to reach. No rate limit:
# the suite submits faster than a person would; test_limits and test_load turn it on.
CAPS = {
    "SMOOTHCERT_MAX_N": "2000000",
    "SMOOTHCERT_MAX_INPUTS": "64",
    "SMOOTHCERT_MAX_REQUEST_BYTES": str(256 << 10),
    "SMOOTHCERT_MAX_UPLOAD_BYTES": str(2 << 20),
    "SMOOTHCERT_RATE_LIMIT_PER_MINUTE": "0",
}


def stack_env(redis_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of every process of the test stack."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMOOTHCERT_")}
    return {
        **env,
        **CAPS,
        "SMOOTHCERT_REDIS_URL": redis_url,
        "SMOOTHCERT_DATA_DIR": str(data_dir),
        "SMOOTHCERT_API_KEY": USER_KEY,
        "SMOOTHCERT_ADMIN_KEY": ADMIN_KEY,
        "SMOOTHCERT_MODEL_CHECK_TIMEOUT_S": "60",
        "SMOOTHCERT_MODEL_CHECK_DEADLINE_S": "45",
        "SMOOTHCERT_DEVICE": "cpu",
        **extra,
    }


def wait_for(
    check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None
):
    """Poll ``check()`` until truthy (processes.wait_until); fail with the whole process log when
    ``proc`` dies or time runs out."""
    children = [] if proc is None else [processes.Child(what, proc, log)]
    try:
        return processes.wait_until(
            check, timeout, what, children=children, ignore=(httpx.HTTPError, redis.RedisError)
        )
    except processes.ChildDied:
        reason = f"exited with {proc.returncode}"
    except processes.NotReady:
        reason = f"not ready within {timeout} s"
    pytest.fail(f"{what} {reason}:\n{log.read_text() if log else ''}")


def start_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """processes.spawn: ``args`` in its own session, output to ``log`` (truncated)."""
    return processes.spawn(args, env, log)


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """processes.stop: SIGTERM, then SIGKILL of the group after ``timeout`` seconds."""
    processes.stop(proc, timeout)


def start_api(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """uvicorn serving the app on a free port; returns the process and its base URL."""
    port = free_port()
    proc = start_process(api_command("127.0.0.1", port), env, log)
    url = f"http://127.0.0.1:{port}"
    wait_for(
        lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, 30, "the API", proc, log
    )
    return proc, url


def other_db(redis_url: str, db: int) -> str:
    """Database ``db`` of the session's Redis server: no session worker or API looks there."""
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


@contextlib.contextmanager
def scratch_db(redis_url: str, db: int) -> Iterator[redis.Redis]:
    """A client on an emptied ``other_db``, emptied again afterwards."""
    client = redis.Redis.from_url(other_db(redis_url, db))
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


@contextlib.contextmanager
def worker_context(redis_url: str, db: int, data_dir: Path, **settings) -> Iterator[WorkerContext]:
    """A worker's composition root on an emptied ``other_db`` and ``data_dir``, as a worker process
    builds it (``settings`` override the environment's), for the queue side's plain functions."""
    with scratch_db(redis_url, db):
        ctx = WorkerContext(
            Settings(redis_url=other_db(redis_url, db), data_dir=data_dir, **settings)
        )
        try:
            yield ctx
        finally:
            ctx.redis().close()


@pytest.fixture(scope="module")
def api_without_redis(tmp_path_factory) -> Iterator[str]:
    """An API pointed at a port where nothing listens."""
    data = tmp_path_factory.mktemp("no-redis")
    proc, url = start_api(stack_env(f"redis://127.0.0.1:{free_port()}/0", data), data / "api.log")
    yield url
    stop_process(proc)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smoothcert-data")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), persist=False).start()
    yield server.url
    server.stop()


def start_worker(
    env: dict[str, str], log: Path, hostname: str, *options: str
) -> tuple[subprocess.Popen, str]:
    """A prefork worker with concurrency 1 and the Celery ``hostname`` (``%h``: this host), ready
    once its heartbeat key is in Redis; returns the process and the worker's name."""
    proc = start_process(
        worker_command(
            "--concurrency",
            "1",
            "--hostname",
            hostname,
            "--without-mingle",
            "--without-gossip",
            *options,
        ),
        env,
        log,
    )
    client = redis.Redis.from_url(env["SMOOTHCERT_REDIS_URL"])
    pattern = HEARTBEAT_PREFIX + hostname.replace("%h", "*")
    try:
        [key] = wait_for(
            lambda: list(client.scan_iter(match=pattern)), 60, f"the worker {hostname}", proc, log
        )
    finally:
        client.close()
    return proc, key.decode()[len(HEARTBEAT_PREFIX) :]


# The session's worker sweeps away job inputs left behind this soon (test_quotas kills an API
# between writing a job's inputs and recording the job): longer than any API of the suite takes
# from writing inputs to recording their job.
ORPHAN_INPUTS_GRACE_S = 5


@pytest.fixture(scope="session")
def worker(redis_url, data_dir) -> Iterator[subprocess.Popen]:
    """The session's worker, ``test@<host>``."""
    env = stack_env(
        redis_url, data_dir, SMOOTHCERT_ORPHAN_INPUTS_GRACE_S=str(ORPHAN_INPUTS_GRACE_S)
    )
    proc, _ = start_worker(env, data_dir / "worker.log", "test@%h")
    yield proc
    stop_process(proc)


@pytest.fixture(scope="session")
def api_url(redis_url, data_dir, worker) -> Iterator[str]:
    proc, url = start_api(stack_env(redis_url, data_dir), data_dir / "api.log")
    yield url
    stop_process(proc)


@pytest.fixture(scope="session")
def client(api_url) -> Iterator[httpx.Client]:
    """Authorized with the user key."""
    with httpx.Client(
        base_url=api_url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=90
    ) as c:
        yield c


@pytest.fixture(scope="session")
def admin(api_url) -> Iterator[httpx.Client]:
    """Authorized with the admin key."""
    with httpx.Client(
        base_url=api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=90
    ) as c:
        yield c


@pytest.fixture(scope="session")
def anonymous(api_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def demo_model(admin, demo_paths) -> dict:
    """The demo's safetensors model, uploaded through the API."""
    with open(demo_paths["safetensors"], "rb") as f:
        resp = admin.post(
            "/v1/models",
            files={"file": ("digits_cnn.safetensors", f)},
            data={"name": "digits", "visibility": "public"},  # as `up` makes the demo model
        )
    assert resp.status_code == 201, resp.text
    return resp.json()


def account_key(url: str, admin_key: str, account: str, *scopes: str) -> str:
    """A new key of ``account`` (scopes: ``certify`` unless given), made through ``POST /v1/keys``
    of the API at ``url`` with ``admin_key``: for a test whose quotas, jobs and datasets must be
    its own on a Redis and data dir the suite shares."""
    resp = httpx.post(
        f"{url}/v1/keys",
        headers={"Authorization": f"Bearer {admin_key}"},
        json={"account": account, "scopes": list(scopes or ("certify",))},
        timeout=30,
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["key"]


def upload_model(
    admin: httpx.Client, filename: str, content: bytes, **fields: str
) -> httpx.Response:
    """``POST /v1/models`` with ``content`` as the file ``filename`` and ``fields`` as form fields;
    public unless ``fields`` say otherwise, so that the user key's account may use it too."""
    fields = {"visibility": "public", **fields}
    return admin.post("/v1/models", files={"file": (filename, io.BytesIO(content))}, data=fields)


def timed_runtimes(data_dir: Path, sha256: str, timeout: float = 60) -> dict:
    """Wait until a worker has timed the runtimes of the model of ``sha256`` (which it does right
    after the upload's check) and cached its choice under ``data_dir``; that cache entry."""
    choices = data_dir / "cache" / "runtime-choices.json"

    def entry():
        if not choices.exists():
            return None
        found = [
            v for k, v in json.loads(choices.read_text()).items() if k.startswith(sha256 + "|")
        ]
        return found[0] if found else None

    return wait_for(entry, timeout, f"the runtimes of model {sha256[:12]} to be timed")


def upload_model_file(admin: httpx.Client, path: Path, **fields: str) -> httpx.Response:
    """:func:`upload_model` of the file at ``path``, under its own name."""
    return upload_model(admin, path.name, path.read_bytes(), **fields)


def upload_dataset(
    client: httpx.Client, content: bytes, filename: str = "data.npz"
) -> httpx.Response:
    """``POST /v1/datasets`` with ``content`` as the file ``filename``."""
    return client.post("/v1/datasets", files={"file": (filename, io.BytesIO(content))})


def wait_job(client: httpx.Client, job_id: str, timeout: float = 60.0, until=TERMINAL):
    """Poll ``GET /v1/jobs/{id}`` until its status is in ``until``; the last record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = client.get(f"/v1/jobs/{job_id}").json()
        if record["status"] in until:
            return record
        time.sleep(0.05)
    pytest.fail(f"job {job_id} still {record['status']} after {timeout} s")
