"""What one API process and one Redis take per job, measured against a real local stack.

    python -m bench.capacity [--repeats 3] [--jobs 300] [--clients 8] [--json out.json]

Starts a private stack in a temporary folder (a Redis-protocol server, one API process, workers as
``smoothcert up`` starts them), uploads the digits demo model and its test split (359 images) as a
dataset, then, in each of ``--repeats`` rounds:

1. **Admission, small jobs.** No worker runs, so the API only admits: ``--clients`` threads post
   ``--jobs`` one-input PREDICT jobs (n = 100) as fast as they are answered. Reported: 202s per
   second of wall time, per second of the API process's CPU time (its share of a core on this
   2-core machine, which the client threads share), Redis commands and microseconds per admitted
   job (``INFO commandstats``: the commands' own time; ``INFO cpu``: the server's whole CPU time),
   Redis memory per queued job (``used_memory``, and ``MEMORY USAGE`` of its keys and message).
2. **Running them.** One worker runs the queued jobs: Redis commands and microseconds per job run,
   then what one client poll of a finished job (``GET /v1/jobs/{id}``) costs, and the memory a
   finished job keeps (``MEMORY USAGE`` summed over the keyspace against the start of the round:
   its record and its index entries; and of the keys with its id alone).
3. **Admission, dataset jobs.** ``--dataset-jobs`` dataset jobs over the whole split, chunk size 10
   (36 chunk messages each), with no worker: submissions per second, commands, microseconds and
   bytes per job and per chunk message.
4. **A dataset job run.** One worker runs one of them (n0 = 10, n = 100): commands and
   microseconds per chunk, and bytes per result row, in Redis and on the data volume.

The figures go to stdout as one JSON object per round, then the median and the range over the
rounds. The client's own Redis reads (the polls that wait for the end of a phase) are counted and
taken out. docs/scaling.md turns them into sizes for 1, 10 and 100 GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import redis

from bench.dataset_job import (
    KEY,
    _start_workers,
    _stop,
    _stop_all,
    _upload,
    _wait,
    bench_env,
    start_api,
)
from smoothcert.models.demo import build_demo
from smoothcert.service.core.jobs import TERMINAL
from smoothcert.service.core.queue import QUEUE, queue_depth
from smoothcert.service.devstack.redis_server import RedisServer

CHUNK_SIZE = 10
IMAGE_SHAPE = (1, 8, 8)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        demo = build_demo(root / "demo", seed=0)
        with RedisServer(root / "redis", persist=False) as server:
            env = bench_env(
                server.url,
                root,
                SMOOTHCERT_DEVICE="cpu",
                SMOOTHCERT_CHUNK_SIZE=str(CHUNK_SIZE),
                SMOOTHCERT_RATE_LIMIT_PER_MINUTE="0",
                SMOOTHCERT_MAX_ACTIVE_JOBS_PER_KEY="1000000",
                SMOOTHCERT_MAX_QUEUED_MESSAGES="1000000",
                SMOOTHCERT_LOG_LEVEL="WARNING",
            )
            api, port = start_api(env, root)
            r = redis.Redis.from_url(server.url)
            try:
                with httpx.Client(
                    base_url=f"http://127.0.0.1:{port}",
                    timeout=120,
                    headers={"Authorization": f"Bearer {KEY}"},
                ) as client:
                    _wait(lambda: client.get("/healthz").status_code == 200, "the API", [api])
                    model_id, dataset_id = _upload(client, demo, env, root, server.url)
                    for i in range(args.repeats):
                        row = _round(
                            client,
                            r,
                            api.proc.pid,
                            model_id,
                            dataset_id,
                            args,
                            env,
                            root,
                            server.url,
                            i,
                        )
                        rounds.append(row)
                        print(json.dumps(row), flush=True)
            finally:
                _stop(api.proc)
    summary = {
        k: {
            "median": statistics.median(row[k] for row in rounds),
            "min": min(row[k] for row in rounds),
            "max": max(row[k] for row in rounds),
        }
        for k in rounds[0]
        if isinstance(rounds[0][k], (int, float))
    }
    report = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "args": vars(args),
        "rounds": rounds,
        "summary": summary,
    }
    print(json.dumps({"summary": summary}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


class RedisMeter:
    """Commands, CPU microseconds and memory of the Redis server over one phase."""

    def __init__(self, r: redis.Redis):
        self.r = r
        self.own_calls = 0  # the client's own commands during the phase, taken out at the end

    def __enter__(self) -> RedisMeter:
        self.r.config_resetstat()
        self.memory = self.r.info("memory")["used_memory"]
        self.cpu = self._redis_cpu_s()
        return self

    def _redis_cpu_s(self) -> float:
        cpu = self.r.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def __exit__(self, *_) -> None:
        stats = self.r.info("commandstats")
        stats.pop("cmdstat_config", None)  # the reset itself
        stats.pop("cmdstat_info", None)  # this read and the memory reads
        self.calls = sum(s["calls"] for s in stats.values()) - self.own_calls
        self.usec = sum(s["usec"] for s in stats.values())
        self.by_command = {k.removeprefix("cmdstat_"): s["calls"] for k, s in stats.items()}
        self.memory_delta = self.r.info("memory")["used_memory"] - self.memory
        # The server's own CPU time: the commands, and the network and protocol work around them.
        self.cpu_usec = (self._redis_cpu_s() - self.cpu) * 1e6

    def depth(self) -> int:
        """Messages waiting in the certify queue (counted as the client's own commands)."""
        self.own_calls += 1
        return queue_depth(self.r, QUEUE)

    def in_flight(self) -> int:
        self.own_calls += 2
        return queue_depth(self.r, QUEUE) + self.r.hlen("unacked")


def _cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _submit_all(client: httpx.Client, bodies: list[dict], clients: int) -> tuple[list[str], float]:
    def one(body: dict) -> str:
        resp = client.post("/v1/certify", json=body)
        if resp.status_code != 202:
            raise SystemExit(f"submission answered {resp.status_code}: {resp.text[:200]}")
        return resp.json()["job_id"]

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        ids = list(pool.map(one, bodies))
    return ids, time.perf_counter() - began


def _drain(meter: RedisMeter, workers: list, what: str) -> float:
    began = time.perf_counter()
    while meter.in_flight():
        if any(w.poll() is not None for w in workers):
            raise SystemExit(f"a worker died while running {what}")
        time.sleep(0.5)
    return time.perf_counter() - began


def _job_keys_bytes(r: redis.Redis, job_id: str) -> int:
    """MEMORY USAGE of every key whose name holds the job's id."""
    return sum(r.memory_usage(k) or 0 for k in r.scan_iter(match=f"*{job_id}*", count=1000))


def _keyspace_bytes(r: redis.Redis) -> int:
    """MEMORY USAGE summed over every key."""
    return sum(r.memory_usage(k) or 0 for k in r.scan_iter(count=1000))


def _message_bytes(r: redis.Redis) -> float:
    """The median length of the task messages waiting in the certify queue (the first 50)."""
    return statistics.median(len(m) for m in r.lrange(QUEUE, 0, 49))


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _round(client, r, api_pid, model_id, dataset_id, args, env, root, redis_url, index) -> dict:
    row: dict = {"round": index}
    image = np.full(IMAGE_SHAPE, 0.5).tolist()
    # 1. admission of small PREDICT jobs, no worker running
    bodies = [
        {
            "model_id": model_id,
            "inputs": [image],
            "mode": "predict",
            "sigma": 0.25,
            "n": 100,
            "seed": 1000 * index + i,
        }
        for i in range(args.jobs)
    ]
    keys_before = _keyspace_bytes(r)
    cpu0 = _cpu_s(api_pid)
    with RedisMeter(r) as meter:
        ids, wall = _submit_all(client, bodies, args.clients)
    api_cpu = _cpu_s(api_pid) - cpu0
    row |= {
        "predict_admitted_per_s": len(ids) / wall,
        "predict_admitted_per_api_cpu_s": len(ids) / api_cpu,
        "predict_submit_redis_commands": meter.calls / len(ids),
        "predict_submit_redis_usec": meter.usec / len(ids),
        "predict_submit_redis_cpu_usec": meter.cpu_usec / len(ids),
        "predict_queued_bytes": meter.memory_delta / len(ids),
    }
    row["predict_queued_keys_bytes"] = statistics.median(_job_keys_bytes(r, i) for i in ids[:50])
    row["predict_message_bytes"] = _message_bytes(r)
    row["predict_submit_commands_by_name"] = {
        k: v / len(ids) for k, v in sorted(meter.by_command.items())
    }
    # 2. one worker runs them
    workers = _start_workers(1, env, root, redis_url, f"r{index}")
    try:
        with RedisMeter(r) as meter:
            drain_s = _drain(meter, workers, "the PREDICT jobs")
    finally:
        _stop_all(workers)
    statuses = [client.get(f"/v1/jobs/{i}").json()["status"] for i in ids]
    assert statuses.count("succeeded") == len(ids), {s: statuses.count(s) for s in set(statuses)}
    row |= {
        "predict_run_redis_commands": meter.calls / len(ids),
        "predict_run_redis_usec": meter.usec / len(ids),
        "predict_run_redis_cpu_usec": meter.cpu_usec / len(ids),
        "predict_jobs_per_s_one_cpu_worker": len(ids) / drain_s,
        "predict_finished_job_bytes": statistics.median(_job_keys_bytes(r, i) for i in ids[:50]),
    }
    # 2b. what a client's poll of a finished job costs (GET /v1/jobs/{id})
    cpu0 = _cpu_s(api_pid)
    with RedisMeter(r) as meter:
        began = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            answers = list(pool.map(lambda i: client.get(f"/v1/jobs/{i}").status_code, ids))
        wall = time.perf_counter() - began
    assert set(answers) == {200}, set(answers)
    row |= {
        "poll_per_s": len(ids) / wall,
        "poll_per_api_cpu_s": len(ids) / (_cpu_s(api_pid) - cpu0),
        "poll_redis_commands": meter.calls / len(ids),
        "poll_redis_cpu_usec": meter.cpu_usec / len(ids),
        # what the finished jobs keep: their records and their entries in the indexes
        # (MEMORY USAGE over the whole keyspace; used_memory moves by more with client buffers)
        "predict_retained_bytes": (_keyspace_bytes(r) - keys_before) / len(ids),
    }
    # 3. admission of dataset jobs, no worker running
    body = {"model_id": model_id, "dataset_id": dataset_id, "sigma": 0.25, "n0": 10, "n": 100}
    bodies = [{**body, "seed": 1000 * index + i} for i in range(args.dataset_jobs)]
    cpu0 = _cpu_s(api_pid)
    with RedisMeter(r) as meter:
        dataset_ids, wall = _submit_all(client, bodies, args.clients)
    api_cpu = _cpu_s(api_pid) - cpu0
    chunks = len(dataset_ids) * -(-359 // CHUNK_SIZE)
    row |= {
        "dataset_admitted_per_s": len(dataset_ids) / wall,
        "dataset_admitted_per_api_cpu_s": len(dataset_ids) / api_cpu,
        "dataset_submit_redis_commands_per_chunk": meter.calls / chunks,
        "dataset_submit_redis_usec_per_chunk": meter.usec / chunks,
        "dataset_submit_redis_cpu_usec_per_chunk": meter.cpu_usec / chunks,
        "dataset_queued_bytes_per_chunk": meter.memory_delta / chunks,
        "dataset_chunk_message_bytes": _message_bytes(r),
    }
    # 4. a dataset job run: the queued ones are canceled and cleared first, then one more runs
    for job_id in dataset_ids:
        client.post(f"/v1/jobs/{job_id}/cancel")
    workers = _start_workers(1, env, root, redis_url, f"d{index}")
    try:
        _drain(RedisMeter(r), workers, "the canceled dataset jobs")
        with RedisMeter(r) as meter:
            first = client.post("/v1/certify", json={**body, "seed": 7}).json()["job_id"]
            _drain(meter, workers, "the dataset job")
            while client.get(f"/v1/jobs/{first}").json()["status"] not in TERMINAL:
                meter.own_calls += 1  # reads the job record
                time.sleep(0.2)
    finally:
        _stop_all(workers)
    job = client.get(f"/v1/jobs/{first}").json()
    assert job["status"] == "succeeded", job.get("error")
    rows = job["result"]["totals"]["inputs"]
    run_chunks = -(-rows // CHUNK_SIZE)
    data = Path(env["SMOOTHCERT_DATA_DIR"])
    row |= {
        "dataset_run_redis_commands_per_chunk": meter.calls / run_chunks,
        "dataset_run_redis_usec_per_chunk": meter.usec / run_chunks,
        "dataset_run_redis_cpu_usec_per_chunk": meter.cpu_usec / run_chunks,
        "dataset_result_redis_bytes_per_row": _job_keys_bytes(r, first) / rows,
        "dataset_result_disk_bytes_per_row": (
            _folder_bytes(data / "results" / first) + _folder_bytes(data / "jobs" / first)
        )
        / rows,
    }
    return row


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=300, help="PREDICT jobs per round")
    parser.add_argument("--dataset-jobs", type=int, default=20, help="dataset jobs per round")
    parser.add_argument("--clients", type=int, default=8, help="concurrent submitting threads")
    parser.add_argument("--json", type=str, default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
