"""``smoothcert up`` end to end: it starts Redis (with a password), the API and a worker, registers
the demo, and the curl example it prints certifies a digit; SIGTERM stops every process it started."""

from __future__ import annotations

import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from smoothcert.service.devstack.redis_server import free_port
from tests.support.stack import wait_job

pytestmark = pytest.mark.process


def read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=0.5))
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if marker in seen[-1]:
            return "".join(seen)
    pytest.fail(f"no {marker!r} from smoothcert up (exit {proc.poll()}):\n{''.join(seen)}")


def redis_port_of_children(pid: int) -> int:
    """The port of the Redis-protocol server among the children of ``pid`` (Linux /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid and "-server" in cmdline.split(" ")[0]:
            return int(re.search(r"(?:127\.0\.0\.1:|--port )(\d+)", cmdline).group(1))
    pytest.fail(f"no Redis server among the children of {pid}")


def test_up_serves_the_printed_curl_example_and_stops_cleanly(tmp_path, demo_paths):
    (tmp_path / "demo").mkdir()
    for key in ("safetensors", "test_x", "test_y"):  # skip training the demo again
        shutil.copy(demo_paths[key], tmp_path / "demo" / demo_paths[key].name)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMOOTHCERT_")}
    env.update(
        SMOOTHCERT_PORT=str(port),
        SMOOTHCERT_DATA_DIR=str(tmp_path),
        SMOOTHCERT_DEVICE="cpu",
        SMOOTHCERT_REDIS_MAXMEMORY=str(64 << 20),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "smoothcert.service.devstack.stack"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out = read_until(proc, "Ctrl-C stops everything", timeout=120)
        assert f"http://127.0.0.1:{port}" in out
        key = re.search(r"API key: (\S+)", out).group(1)
        curl = shlex.split(next(line for line in out.splitlines() if "/v1/certify" in line))
        body, url = curl[curl.index("-d") + 1], curl[-1]
        assert f"Authorization: Bearer {key}" in curl
        with httpx.Client(
            headers={"Authorization": f"Bearer {key}"},
            base_url=url.rsplit("/v1/", 1)[0],
            timeout=30,
        ) as client:
            resp = client.post(
                "/v1/certify", content=body, headers={"Content-Type": "application/json"}
            )
            assert resp.status_code == 202, resp.text
            job = wait_job(client, resp.json()["job_id"])
            # The Redis it started has the memory budget it was given, and evicts nothing.
            memory = client.get("/readyz").json()["redis_memory"]
        assert job["status"] == "succeeded", job["error"]
        assert memory["max_bytes"] == 64 << 20 and memory["policy"] == "noeviction"
        assert job["result"]["results"][0]["radius"] > 0
        # The Redis it started, which its API and worker use, lets no one in without the password.
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=redis_port_of_children(proc.pid), socket_timeout=5).keys()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert code == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
