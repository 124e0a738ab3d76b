"""Images per second of a dataset job through the whole service, with one worker, two, ...

    python -m bench.dataset_job [--workers 1,2] [--n0 100] [--n 10000] [--sigma 0.25]
                                [--chunk-size 100] [--device cpu] [--json out.json]

Starts a private stack in a temporary folder (a Redis-protocol server, the API, and for each
worker count that many worker processes of concurrency 1, started as ``smoothcert up`` starts
its worker), uploads the digits demo model and its test split (359 images) as a dataset, and
certifies the whole split with seed 0. Reported per worker count: the job's own
``totals.images_per_s`` (inputs over the time from the first chunk's start to the result) and
the wall time from submit to result as the client sees it. Each worker count gets fresh worker
processes, so every worker loads the model once inside the timing (milliseconds for this one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import redis

from smoothcert.models.demo import build_demo
from smoothcert.service.core.jobs import TERMINAL
from smoothcert.service.core.workers import HEARTBEAT_PREFIX
from smoothcert.service.devstack import processes
from smoothcert.service.devstack.commands import api_command, worker_command
from smoothcert.service.devstack.redis_server import RedisServer, free_port

KEY = "bench-key-0123456789abcdef"


def bench_env(redis_url: str, root: Path, **settings: str) -> dict[str, str]:
    """The environment of a bench's stack (its API and workers): its Redis, a data dir under
    ``root``, :data:`KEY` as both keys, and ``settings`` (full SMOOTHCERT_ names) beside."""
    return {
        **os.environ,
        "SMOOTHCERT_REDIS_URL": redis_url,
        "SMOOTHCERT_DATA_DIR": str(root / "data"),
        "SMOOTHCERT_API_KEY": KEY,
        "SMOOTHCERT_ADMIN_KEY": KEY,
        **settings,
    }


def start_api(env: dict[str, str], root: Path) -> tuple[processes.Child, int]:
    """An API process of the bench's stack on a free loopback port (its log ``root/api.log``)."""
    port = free_port()
    log = root / "api.log"
    return processes.Child(
        "API", processes.spawn(api_command("127.0.0.1", port), env, log), log
    ), port


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        demo = build_demo(root / "demo", seed=0)
        with RedisServer(root / "redis", persist=False) as server:
            env = bench_env(
                server.url,
                root,
                SMOOTHCERT_DEVICE=args.device,
                SMOOTHCERT_CHUNK_SIZE=str(args.chunk_size),
                SMOOTHCERT_MAX_N=str(max(args.n, 10**6)),
            )
            api, port = start_api(env, root)
            try:
                with httpx.Client(
                    base_url=f"http://127.0.0.1:{port}",
                    timeout=120,
                    headers={"Authorization": f"Bearer {KEY}"},
                ) as client:
                    _wait(lambda: client.get("/healthz").status_code == 200, "the API", [api])
                    model_id, dataset_id = _upload(client, demo, env, root, server.url)
                    for count in args.workers:
                        rows.append(
                            _measure(
                                client, count, model_id, dataset_id, args, env, root, server.url
                            )
                        )
                        print(json.dumps(rows[-1]))
            finally:
                _stop(api.proc)
    report = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _upload(
    client: httpx.Client, demo: dict, env: dict, root: Path, redis_url: str
) -> tuple[str, str]:
    """The demo model (checked by a temporary worker) and the digits test split as a dataset."""
    workers = _start_workers(1, env, root, redis_url, "check")
    try:
        with open(demo["safetensors"], "rb") as f:
            model = client.post(
                "/v1/models", files={"file": ("digits_cnn.safetensors", f)}
            ).raise_for_status()
    finally:
        _stop_all(workers)
    buf_path = root / "digits_test.npz"
    np.savez(buf_path, x=np.load(demo["test_x"]), y=np.load(demo["test_y"]))
    with open(buf_path, "rb") as f:
        dataset = client.post(
            "/v1/datasets", files={"file": ("digits_test.npz", f)}
        ).raise_for_status()
    return model.json()["id"], dataset.json()["id"]


def _measure(
    client, count: int, model_id: str, dataset_id: str, args, env, root: Path, redis_url: str
) -> dict:
    workers = _start_workers(count, env, root, redis_url, f"w{count}")
    try:
        submitted = time.perf_counter()
        body = {
            "model_id": model_id,
            "dataset_id": dataset_id,
            "sigma": args.sigma,
            "n0": args.n0,
            "n": args.n,
            "seed": 0,
        }
        job_id = client.post("/v1/certify", json=body).raise_for_status().json()["job_id"]
        while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in TERMINAL:
            time.sleep(0.2)
        wall = time.perf_counter() - submitted
    finally:
        _stop_all(workers)
    if job["status"] != "succeeded":
        raise SystemExit(f"the job {job['status']}: {job['error']}")
    totals, provenance = job["result"]["totals"], job["result"]["provenance"]
    return {
        "workers": count,
        "inputs": totals["inputs"],
        "chunks": totals["chunks"],
        "n0": args.n0,
        "n": args.n,
        "images_per_s": round(totals["images_per_s"], 3),
        "job_elapsed_s": round(totals["elapsed_s"], 2),
        "submit_to_result_s": round(wall, 2),
        "workers_used": provenance["workers"],
        "device": provenance["device"],
        "batch_size": provenance["batch_size"],
        "certified_accuracy_at_0": job["result"]["certified_accuracy"][0]["accuracy"],
    }


def _start_workers(
    count: int, env: dict, root: Path, redis_url: str, tag: str
) -> list[subprocess.Popen]:
    workers = []
    for i in range(count):
        log = root / f"worker-{tag}-{i}.log"
        command = worker_command(
            "--concurrency",
            "1",
            "--hostname",
            f"{tag}-{i}@%h",
            "--without-mingle",
            "--without-gossip",
        )
        workers.append(
            processes.Child(f"worker {tag}-{i}", processes.spawn(command, env, log), log)
        )
    client = redis.Redis.from_url(redis_url)
    try:
        _wait(
            lambda: len(list(client.scan_iter(match=f"{HEARTBEAT_PREFIX}{tag}-*"))) == count,
            f"{count} workers",
            workers,
        )
    except SystemExit:
        _stop_all([w.proc for w in workers])
        raise
    return [w.proc for w in workers]


def _wait(check, what: str, children: list[processes.Child], timeout: float = 120.0) -> None:
    """processes.wait_until, ending the benchmark in one line when a child dies or time runs out."""
    try:
        processes.wait_until(
            check, timeout, what, children=children, ignore=(httpx.HTTPError, redis.RedisError)
        )
    except (processes.NotReady, processes.ChildDied) as exc:
        raise SystemExit(str(exc)) from None


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL to the whole process group (a worker's pool children too)."""
    processes.stop(proc, 30)


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        _stop(proc)


def _parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench.dataset_job", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--workers",
        default="1,2",
        type=lambda s: [int(v) for v in s.split(",")],
        help="worker counts to measure, e.g. 1,2",
    )
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--chunk-size", type=int, default=100)
    p.add_argument("--device", default="cpu", help="the workers' SMOOTHCERT_DEVICE")
    p.add_argument("--json", help="also write the report here")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
