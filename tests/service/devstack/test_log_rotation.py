"""The logs `smoothcert up` writes rotate: a flood of requests to its API leaves a bounded number
of files of bounded size, the newest lines in ``api.log``. The API is started the way ``Stack``
starts it (its own log relay and rotation), without Redis or a worker."""

from __future__ import annotations

import json

import httpx
import pytest

from smoothcert.service.core.settings import Settings
from smoothcert.service.devstack.commands import api_command
from smoothcert.service.devstack.redis_server import free_port
from smoothcert.service.devstack.stack import Stack
from tests.support.stack import wait_for

pytestmark = pytest.mark.process

MAX_BYTES, BACKUPS, REQUESTS = 16 << 10, 2, 600


def test_a_flood_of_requests_leaves_bounded_log_files(tmp_path, monkeypatch):
    for name in ("SMOOTHCERT_API_KEY", "SMOOTHCERT_ADMIN_KEY", "SMOOTHCERT_REDIS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    settings = Settings(
        data_dir=tmp_path,
        port=port,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing there: /healthz needs none
        log_max_bytes=MAX_BYTES,
        log_backups=BACKUPS,
    )
    stack = Stack(settings)
    stack.logs.mkdir(parents=True)
    url = f"http://127.0.0.1:{port}"
    try:
        stack._spawn("api", api_command("127.0.0.1", port))
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, 30, "the API")
        with httpx.Client(base_url=url) as client:
            for i in range(REQUESTS):
                assert client.get("/healthz", params={"n": i}).status_code == 200
        wait_for(
            lambda: len(list(stack.logs.glob("api.log*"))) == 1 + BACKUPS,
            10,
            "the rotated logs",
        )
    finally:
        stack.stop()
    files = sorted(p.name for p in stack.logs.glob("api.log*"))
    assert files == ["api.log", "api.log.1", "api.log.2"]
    sizes = [(stack.logs / name).stat().st_size for name in files]
    assert all(0 < size <= MAX_BYTES for size in sizes), sizes
    entries = [
        json.loads(line) for name in files for line in (stack.logs / name).read_text().splitlines()
    ]
    access = [e for e in entries if e["logger"] == "smoothcert.access"]
    # the oldest lines (the start-up, the first requests) were dropped; every file is whole lines
    assert not any("startup complete" in e["message"] for e in entries)
    assert 0 < len(access) < REQUESTS
    newest = [json.loads(line) for line in (stack.logs / "api.log").read_text().splitlines()]
    assert any(e["logger"] == "smoothcert.access" for e in newest)
