"""A bounded burst of certify submissions from a process of its own, for tests/service/test_load.py.

Each of ``--submissions`` workers (``--concurrency`` at a time, over as many connections) posts
one tiny certify job and, when it is accepted, polls it to the end. One JSON object goes to
stdout: ``{"outcomes": [{"index", "status", "retry_after", "detail", "job_id", "final"}, ...]}``
(``final`` is the job's last status, ``"timeout"`` when it did not finish in ``--job-timeout`` s).

    python tests/service/load_client.py URL API_KEY MODEL_ID [--submissions 60] [--concurrency 12]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

IMAGE = [[[0.5] * 8] * 8]
TERMINAL = {"succeeded", "failed", "canceled"}


def poll(client: httpx.Client, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job_id}").json()["status"]
        if status in TERMINAL:
            return status
        time.sleep(0.1)
    return "timeout"


def one(client: httpx.Client, args: argparse.Namespace, index: int) -> dict[str, Any]:
    body = {
        "model_id": args.model_id,
        "inputs": IMAGE,
        "sigma": 0.25,
        "n0": args.n0,
        "n": args.n,
        "seed": args.seed + index,
    }
    resp = client.post("/v1/certify", json=body)
    out: dict[str, Any] = {
        "index": index,
        "status": resp.status_code,
        "retry_after": resp.headers.get("Retry-After"),
        "detail": None,
        "job_id": None,
        "final": None,
    }
    if resp.status_code == 202:
        out["job_id"] = resp.json()["job_id"]
        out["final"] = poll(client, out["job_id"], args.job_timeout)
    else:
        try:
            out["detail"] = resp.json().get("detail")
        except ValueError:
            out["detail"] = resp.text[:200]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("api_key")
    parser.add_argument("model_id")
    parser.add_argument("--submissions", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--n0", type=int, default=10)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="job i gets seed + i")
    parser.add_argument("--job-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    with (
        httpx.Client(
            base_url=args.url,
            headers={"Authorization": f"Bearer {args.api_key}"},
            timeout=60,
            limits=limits,
        ) as client,
        ThreadPoolExecutor(args.concurrency) as pool,
    ):
        outcomes = list(pool.map(lambda i: one(client, args, i), range(args.submissions)))
    json.dump({"outcomes": outcomes}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
