"""The compose deployment built and run, with real faults put into its containers.

`make deploy-test` only (marker ``deploy``, which `make test` deselects): the module brings up
its own compose project (docker/docker-compose.yml + docker/compose.cpu.yml, two certify
workers and the trainer) through ``smoothcert.service.devstack.deploy up``, on a free port with
fresh keys, and removes it with its volumes at the end. podman here, Docker where an engine
answers. Redis has no published port, so what the tests read from it they read with redis-cli
inside its container.

Each fault test records how long the recovery took (the summary prints it). The worker
heartbeat TTL is set to HEARTBEAT_TTL_S for this deployment, so a task that comes back "at
once" after ``stop`` (well under the TTL) is told apart from one reaped after a dead heartbeat.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from smoothcert.service.client.service_client import ServiceClient
from smoothcert.service.devstack.deploy import Deployment, detect_engine
from smoothcert.service.devstack.redis_server import free_port
from tests.support.paths import ROOT
from tests.support.stack import wait_for

pytestmark = pytest.mark.deploy

PROJECT = "smoothcert-e2e"
HEARTBEAT_TTL_S = 30
# podman-compose applies the compose file's stop_grace_period (60 s) only to its own stop and down;
# a plain `podman stop` gets the same grace this way, as `docker stop` does from the container.
STOP_GRACE_S = "60"
DEPLOY = [sys.executable, "-m", "smoothcert.service.devstack.deploy"]
UP_TIMEOUT_S = 1500  # a cold build of the worker image (torch) on two shared cores
JOB_TIMEOUT_S = 300
ENGINE_MODULES = ("torch", "onnxruntime", "onnx", "safetensors", "scipy", "matplotlib", "sklearn")
# Paths the engine itself changes in every container: the mount points of the hosts, hostname
# and resolv.conf files it manages make /etc itself count as changed.
ENGINE_OWNED = {"/etc"}


@dataclass
class Deployed:
    deployment: Deployment
    url: str
    api_key: str
    admin_key: str

    def engine(self, *args: str, check: bool = True, timeout: float = 180) -> str:
        done = subprocess.run(
            [self.deployment.engine.name, *args],
            env=self.deployment.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert not check or done.returncode == 0, f"{args}: {done.stderr}"
        return done.stdout

    def one(self, service: str) -> str:
        [name] = self.deployment.containers(service)
        return name

    def redis_cli(self, *args: str) -> str:
        return self.engine(
            "exec", self.one("redis"), "redis-cli", "--no-auth-warning", *args
        ).strip()

    def hostname(self, container: str) -> str:
        return self.engine("inspect", "--format", "{{.Config.Hostname}}", container).strip()


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Deployed:
    tmp = tmp_path_factory.mktemp("deploy")
    keys = {
        "SMOOTHCERT_API_KEY": secrets.token_urlsafe(24),
        "SMOOTHCERT_ADMIN_KEY": secrets.token_urlsafe(24),
        "SMOOTHCERT_REDIS_PASSWORD": secrets.token_urlsafe(24),
    }
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SMOOTHCERT_")}
    environ |= keys | {
        "SMOOTHCERT_HOST": "127.0.0.1",
        "SMOOTHCERT_PORT": str(free_port()),
        "SMOOTHCERT_WORKER_HEARTBEAT_TTL_S": str(HEARTBEAT_TTL_S),
    }
    env_file = ROOT / "docker" / ".env"
    had_env_file = env_file.exists()
    log = tmp / "up.log"
    try:
        with open(log, "w") as out:
            done = subprocess.run(
                [*DEPLOY, "up", "--project", PROJECT, "--no-demo"],
                cwd=ROOT,
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=UP_TIMEOUT_S,
            )
        assert done.returncode == 0, tail(log)
        deployment = Deployment(ROOT, PROJECT, detect_engine(ROOT), environ)
        yield Deployed(
            deployment,
            f"http://127.0.0.1:{environ['SMOOTHCERT_PORT']}",
            keys["SMOOTHCERT_API_KEY"],
            keys["SMOOTHCERT_ADMIN_KEY"],
        )
    finally:
        subprocess.run(
            [*DEPLOY, "down", "--project", PROJECT, "--volumes"],
            cwd=ROOT,
            env=environ,
            timeout=300,
            stdout=subprocess.DEVNULL,
        )
        if not had_env_file:
            env_file.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def client(deployed) -> httpx.Client:
    with httpx.Client(
        base_url=deployed.url, headers={"Authorization": f"Bearer {deployed.api_key}"}, timeout=60
    ) as c:
        yield c


@pytest.fixture(scope="module")
def admin(deployed) -> httpx.Client:
    with httpx.Client(
        base_url=deployed.url,
        headers={"Authorization": f"Bearer {deployed.admin_key}"},
        timeout=200,
    ) as c:
        yield c


@pytest.fixture(scope="module")
def model(admin, demo_paths) -> dict:
    with open(demo_paths["safetensors"], "rb") as f:
        resp = admin.post(
            "/v1/models",
            files={"file": ("digits_cnn.safetensors", f)},
            data={"name": "digits", "visibility": "public"},  # the user key certifies with it
        )
    assert resp.status_code == 201, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def digits(demo_paths) -> tuple[np.ndarray, np.ndarray]:
    return np.load(demo_paths["test_x"]), np.load(demo_paths["test_y"])


def poll(client: httpx.Client, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict:
    """The job's record once finished; answers other than 200 (a container away) are retried."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            resp = client.get(f"/v1/jobs/{job_id}")
        except httpx.TransportError:
            resp = None
        if (
            resp is not None
            and resp.status_code == 200
            and resp.json()["status"] in ("succeeded", "failed", "canceled")
        ):
            return resp.json()
        assert resp is None or resp.status_code in (200, 502, 503), (resp.status_code, resp.text)
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not finish within {timeout} s")


def submit(client: httpx.Client, model: dict, digits, n: int, seed: int) -> str:
    resp = client.post(
        "/v1/certify",
        json={
            "model_id": model["id"],
            "inputs": digits[0][:4].tolist(),
            "sigma": 0.25,
            "n0": 100,
            "n": n,
            "seed": seed,
            "batch_size": 500,
        },
    )
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


def lease(deployed: Deployed, job_id: str) -> dict | None:
    raw = deployed.redis_cli("HGET", "smoothcert:leases", job_id)
    return json.loads(raw) if raw else None


def running_on(deployed: Deployed, client: httpx.Client, job_id: str) -> str:
    """The worker container that holds the job's lease, once it has drawn samples."""
    held = wait_for(  # the lease as seen while the job ran (read once: it may end right after)
        lambda: (
            client.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] > 0
            and lease(deployed, job_id)
        ),
        JOB_TIMEOUT_S,
        f"job {job_id} running",
    )
    host = held["worker"].partition("@")[2]
    [container] = [
        c for c in deployed.deployment.containers("worker") if deployed.hostname(c) == host
    ]
    return container


def certify_workers(client: httpx.Client) -> list[str]:
    resp = client.get("/readyz")
    if resp.status_code != 200:
        return []
    return sorted(w["name"] for w in resp.json()["worker_details"] if "certify" in w["queues"])


def restore_workers(deployed: Deployed, client: httpx.Client, container: str) -> None:
    """Start ``container`` again and wait until /readyz lists two certify workers."""
    deployed.engine("start", container)
    wait_for(lambda: len(certify_workers(client)) == 2, 180, "two certify workers again")


# --- the images and containers ------------------------------------------------------------------


def test_the_api_container_has_no_engine_and_every_container_runs_unprivileged(deployed):
    found = "import importlib.util as u; print([m for m in {!r} if u.find_spec(m)])".format(
        ENGINE_MODULES
    )
    assert deployed.engine("exec", deployed.one("api"), "python", "-c", found).strip() == "[]"
    worker = deployed.deployment.containers("worker")[0]  # the check can fail: the worker has them
    assert "torch" in deployed.engine("exec", worker, "python", "-c", found)
    containers = deployed.deployment.containers()
    assert len(containers) == 5, containers  # redis, api, two workers, the trainer
    for container in containers:
        users = deployed.engine("top", container, "user").split()[1:]
        assert users and "root" not in users, (container, users)
        assert deployed.engine("exec", container, "id", "-u").strip() != "0", container


def test_healthchecks_pass_and_readyz_lists_both_workers(deployed, client):
    for service in ("redis", "api"):
        container = deployed.one(service)
        if (
            deployed.deployment.engine.name == "podman"
        ):  # no systemd here to schedule podman's checks
            deployed.engine("healthcheck", "run", container)
        else:
            wait_for(
                lambda: (
                    deployed.engine(
                        "inspect", "--format", "{{.State.Health.Status}}", container
                    ).strip()
                    == "healthy"
                ),
                120,
                f"{container} healthy",
            )
    hostnames = {deployed.hostname(c) for c in deployed.deployment.containers("worker")}
    assert {name.partition("@")[2] for name in certify_workers(client)} == hostnames and len(
        hostnames
    ) == 2
    ready = client.get("/readyz").json()
    assert any(w["queues"] == ["train"] for w in ready["worker_details"])


# --- the service through the containers ---------------------------------------------------------


def test_upload_certify_and_a_dataset_job_over_both_workers(deployed, client, model, digits):
    assert model["input_shape"] == [1, 8, 8] and model["num_classes"] == 10
    record = poll(client, submit(client, model, digits, n=2000, seed=1))
    assert record["status"] == "succeeded", record["error"]
    rows = record["result"]["results"]
    assert [r["prediction"] for r in rows if not r["abstained"]] == [
        int(y) for r, y in zip(rows, digits[1][:4]) if not r["abstained"]
    ]

    buf = io.BytesIO()
    np.savez(buf, x=digits[0][:300], y=digits[1][:300])
    resp = client.post("/v1/datasets", files={"file": ("digits.npz", buf.getvalue())})
    assert resp.status_code == 201, resp.text
    resp = client.post(
        "/v1/certify",
        json={
            "model_id": model["id"],
            "dataset_id": resp.json()["id"],
            "sigma": 0.25,
            "n0": 10,
            "n": 200,
            "seed": 11,
        },
    )
    assert resp.status_code == 202, resp.text
    job = poll(client, resp.json()["job_id"])
    assert job["status"] == "succeeded", job["error"]
    assert len(job["result"]["results"]) == 300
    provenance = job["result"]["provenance"]
    assert len(provenance["chunks"]) == 3
    workers = {w.partition("@")[2] for w in provenance["workers"]}
    assert workers == {deployed.hostname(c) for c in deployed.deployment.containers("worker")}, (
        provenance["workers"]
    )


def test_a_short_training_job_runs_on_the_trainer(deployed, admin):
    resp = admin.post(
        "/v1/train",
        json={
            "dataset": "digits",
            "method": "gaussian",
            "sigma": 0.25,
            "batch_size": 128,
            "seed": 3,
            "epochs": 1,
            "name": "trained-in-a-container",
        },
    )
    assert resp.status_code == 202, resp.text
    job = poll(admin, resp.json()["job_id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["kind"] == "train" and job["progress"] == {"done": 1, "total": 1, "unit": "epochs"}
    trained = admin.get(f"/v1/models/{job['result']['model_id']}").json()
    assert trained["name"] == "trained-in-a-container" and trained["train_job"] == job["id"]


# --- faults -----------------------------------------------------------------------------------------


def test_a_worker_killed_mid_job_loses_nothing(deployed, client, model, digits, record_property):
    job_id = submit(client, model, digits, n=20_000, seed=20261201)
    victim = running_on(deployed, client, job_id)
    killed = time.monotonic()
    deployed.engine("kill", "--signal", "KILL", victim)
    record = poll(client, job_id)
    recovered = time.monotonic() - killed
    assert record["status"] == "succeeded", record["error"]
    assert deployed.redis_cli("HGET", f"smoothcert:job:{job_id}", "deliveries") == "2"
    record_property("kill_to_succeeded_s", recovered)
    # Sent again only once the dead worker's heartbeat expired (no shutdown could put it back).
    assert recovered >= HEARTBEAT_TTL_S / 2, recovered

    again = poll(client, submit(client, model, digits, n=20_000, seed=20261201))
    assert again["status"] == "succeeded", again["error"]
    assert without_timings(record["result"]["results"]) == without_timings(
        again["result"]["results"]
    )
    restore_workers(deployed, client, victim)


def test_a_worker_stopped_mid_job_puts_the_task_back_at_once(
    deployed, client, model, digits, record_property
):
    # 100,000 samples per input: still running when its worker is stopped (20,000 could end first)
    job_id = submit(client, model, digits, n=100_000, seed=7)
    stopped = running_on(deployed, client, job_id)
    [other] = [c for c in deployed.deployment.containers("worker") if c != stopped]
    began = time.monotonic()
    deployed.engine("stop", "--time", STOP_GRACE_S, stopped)
    stop_s = time.monotonic() - began
    other_host = deployed.hostname(other)
    wait_for(
        lambda: (lease(deployed, job_id) or {}).get("worker", "").endswith("@" + other_host),
        120,
        "the other worker taking the job",
    )
    taken_s = time.monotonic() - began
    record = poll(client, job_id)
    done_s = time.monotonic() - began
    assert record["status"] == "succeeded", record["error"]
    record_property("stop_returned_s", stop_s)
    record_property("stop_to_taken_by_other_s", taken_s)
    record_property("stop_to_succeeded_s", done_s)
    # The requeue of the cold shutdown, not a dead heartbeat (nor the hours-long visibility timeout).
    assert taken_s < HEARTBEAT_TTL_S, taken_s
    restore_workers(deployed, client, stopped)


def test_a_redis_restart_between_submit_and_poll_loses_no_record(
    deployed, client, model, digits, record_property
):
    # Both certify workers stopped first, so the job waits in the queue (a message in Redis) and its
    # record is "queued" while Redis goes down and comes back from its append-only file.
    workers = deployed.deployment.containers("worker")
    deployed.engine("stop", "--time", STOP_GRACE_S, *workers)
    job_id = submit(client, model, digits, n=10_000, seed=3)
    began = time.monotonic()
    deployed.engine("restart", deployed.one("redis"))
    answer = lambda: client.get(f"/v1/jobs/{job_id}")  # noqa: E731 - 503 while the API reconnects
    record = wait_for(
        lambda: answer().status_code == 200 and answer().json(), 60, "the record after the restart"
    )
    assert record["id"] == job_id and record["status"] == "queued"
    deployed.engine("start", *workers)
    record = poll(client, job_id)
    record_property("redis_restart_to_succeeded_s", time.monotonic() - began)
    assert record["status"] == "succeeded", record["error"]
    assert len(record["result"]["results"]) == 4
    assert client.get(f"/v1/jobs/{job_id}").json() == record
    wait_for(lambda: len(certify_workers(client)) == 2, 180, "two certify workers again")


def test_an_api_restart_shows_pollers_503_at_worst_then_the_job(
    deployed, client, model, digits, record_property
):
    job_id = submit(client, model, digits, n=20_000, seed=4)
    seen: list[
        tuple[int | str, str | None]
    ] = []  # (HTTP status or "unreachable", the job's status)
    waited: dict = {}
    stop = threading.Event()

    def watch() -> None:  # a plain poller: every answer it gets, through the restart and after it
        with httpx.Client(
            base_url=deployed.url,
            headers={"Authorization": f"Bearer {deployed.api_key}"},
            timeout=10,
        ) as c:
            while not stop.is_set():
                try:
                    resp = c.get(f"/v1/jobs/{job_id}")
                    seen.append(
                        (
                            resp.status_code,
                            resp.json().get("status") if resp.status_code == 200 else None,
                        )
                    )
                except httpx.TransportError:
                    seen.append(("unreachable", None))
                time.sleep(0.05)

    def wait() -> None:  # the project's client, polling since before the restart, rides it out
        with ServiceClient(deployed.url, deployed.api_key) as service:
            try:
                waited["record"] = service.wait(job_id, timeout=JOB_TIMEOUT_S, progress=False)
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                waited["error"] = exc

    threads = [threading.Thread(target=watch), threading.Thread(target=wait)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: seen, 60, "the first poll")
        began = time.monotonic()
        deployed.engine("restart", deployed.one("api"))
        threads[1].join(JOB_TIMEOUT_S)
        after = len(seen)
        wait_for(lambda: len(seen) > after and seen[-1][0] == 200, 60, "the poller's next answer")
        record_property("api_restart_to_succeeded_s", time.monotonic() - began)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert "error" not in waited, waited.get("error")
    assert waited["record"]["status"] == "succeeded", waited["record"]["error"]
    codes = [code for code, _ in seen]
    assert {"unreachable", 502, 503} & set(codes), "the poller never saw the API away"
    assert set(codes) <= {200, 502, 503, "unreachable"}, sorted(map(str, set(codes)))
    assert seen[-1] == (200, "succeeded")


def test_nothing_is_written_outside_the_volumes(deployed):
    """Run last: every container's own layer after all of the above, restarts included."""
    for container in deployed.deployment.containers():
        changed = [
            line.split(None, 1)
            for line in deployed.engine("diff", container).splitlines()
            if line.strip()
        ]
        outside = [f"{kind} {path}" for kind, path in changed if path not in ENGINE_OWNED]
        assert outside == [], (container, outside)
