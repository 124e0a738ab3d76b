"""A bounded burst from another process: every submission is accepted and runs, or is refused with
429/503 and a Retry-After; nothing else, and no refused submission leaves a job behind.

``load_client.py`` (a subprocess) sends SUBMISSIONS tiny certify jobs over CONCURRENCY
connections to an extra API instance with a small rate limit and a small queue bound, on the
session's Redis, so the session's worker runs what is accepted; then it polls those to the end.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest
import redis

from tests.service.api.test_limits import jobs_with_seeds
from tests.support.paths import TESTS
from tests.support.stack import ADMIN_KEY, account_key, stack_env, start_api, stop_process

SUBMISSIONS, CONCURRENCY = 60, 12
RATE, CAP = (
    20,
    2,
)  # per minute (bursts of 20: at least 40 of the 60 must be refused); waiting messages
LOAD_ACCOUNT = "load"  # an account of its own: its rate limit counts only this test
CLIENT = TESTS / "support" / "load_client.py"


@pytest.fixture(scope="module")
def load_api(redis_url, data_dir, worker):
    env = stack_env(
        redis_url,
        data_dir,
        SMOOTHCERT_RATE_LIMIT_PER_MINUTE=str(RATE),
        SMOOTHCERT_MAX_QUEUED_MESSAGES=str(CAP),
    )
    proc, url = start_api(env, data_dir / "api-load.log")
    yield url, account_key(url, ADMIN_KEY, LOAD_ACCOUNT)
    stop_process(proc)


def test_burst_gets_accepted_and_run_or_refused_with_retry_after(load_api, redis_url, demo_model):
    seed = secrets.randbelow(2**40)
    url, key = load_api
    run = subprocess.run(
        [
            sys.executable,
            str(CLIENT),
            url,
            key,
            demo_model["id"],
            "--submissions",
            str(SUBMISSIONS),
            "--concurrency",
            str(CONCURRENCY),
            "--n0",
            "10",
            "--n",
            "50",
            "--seed",
            str(seed),
            "--job-timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    outcomes = json.loads(run.stdout)["outcomes"]
    assert sorted(o["index"] for o in outcomes) == list(range(SUBMISSIONS))

    by_status: dict[int, list[dict]] = {}
    for o in outcomes:
        by_status.setdefault(o["status"], []).append(o)
    assert set(by_status) <= {202, 429, 503}, {s: v[0] for s, v in by_status.items()}
    accepted, refused = by_status.get(202, []), by_status.get(429, []) + by_status.get(503, [])
    assert accepted and by_status.get(429), sorted(by_status)
    assert [o for o in accepted if o["final"] != "succeeded"] == []
    assert [
        o for o in refused if not (o["retry_after"] or "").isdigit() or int(o["retry_after"]) < 1
    ] == []
    assert all("rate limit" in o["detail"] for o in by_status.get(429, []))
    assert all("queue is full" in o["detail"] for o in by_status.get(503, []))
    # One job record per accepted submission, none for a refused one.
    made = jobs_with_seeds(redis.Redis.from_url(redis_url), range(seed, seed + SUBMISSIONS))
    assert sorted(made) == sorted(o["job_id"] for o in accepted)
