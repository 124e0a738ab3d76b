"""The Python client against real APIs: submissions retried with one Idempotency-Key, waits that
ride out an outage.

Dataset uploads stand in for submissions where a test needs no worker (they pass the same gate).
"""

from __future__ import annotations

import io
import threading
import time

import httpx
import numpy as np
import pytest
import redis

from smoothcert.service.client.service_client import ClientError, ServiceClient
from smoothcert.service.core.jobs import JobStore, new_job_id
from smoothcert.service.devstack.redis_server import RedisServer
from tests.support.stack import USER_KEY, other_db, scratch_db, stack_env, start_api, stop_process

pytestmark = pytest.mark.process

RATE = 60  # per minute: a burst of 60, then one a second


def tiny_npz(path) -> str:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((2, 1, 8, 8), np.float32), y=np.array([0, 1]))
    path.write_bytes(buf.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def limited_api(redis_url, tmp_path_factory):
    """An API with a rate limit of RATE per minute, on a database of its own."""
    data = tmp_path_factory.mktemp("retries")
    with scratch_db(redis_url, 3):
        env = stack_env(other_db(redis_url, 3), data, SMOOTHCERT_RATE_LIMIT_PER_MINUTE=str(RATE))
        proc, url = start_api(env, data / "api.log")
        yield url
        stop_process(proc)


def test_a_rate_limited_upload_waits_retry_after_and_goes_through(limited_api, tmp_path, capsys):
    path = tiny_npz(tmp_path / "d.npz")
    # Spend the burst. The bucket refills one a second while the uploads go out, so on a slow
    # machine a few more than RATE may pass before the first 429: allow exactly that many.
    codes: list[int] = []
    started = time.monotonic()
    with httpx.Client(base_url=limited_api, headers={"Authorization": f"Bearer {USER_KEY}"}) as raw:
        while 429 not in codes and len(codes) < 3 * RATE:
            codes.append(
                raw.post("/v1/datasets", files={"file": ("d.npz", open(path, "rb"))}).status_code
            )
    elapsed = time.monotonic() - started
    assert codes[-1] == 429 and set(codes[:-1]) == {201}
    assert (
        RATE <= len(codes) - 1 <= RATE + int(elapsed) + 1
    )  # the burst, plus what refilled meanwhile
    with ServiceClient(limited_api, USER_KEY) as client:
        record = client.upload_dataset(path, name="after-the-limit")
        names = [d["name"] for d in client.list_datasets()]
    assert record["name"] == "after-the-limit" and names.count("after-the-limit") == 1
    err = capsys.readouterr().err
    assert "429" in err and "retrying in 1 s" in err


class LoseFirstAnswer(httpx.HTTPTransport):
    """A real connection whose first POST reaches the server but whose answer never arrives."""

    def __init__(self):
        super().__init__()
        self.posts: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST":
            self.posts.append(request.headers.get("Idempotency-Key"))
            if len(self.posts) == 1:
                response.read()
                raise httpx.ReadTimeout("the answer was lost", request=request)
        return response


def test_a_submission_whose_answer_was_lost_is_sent_again_and_makes_one_dataset(api_url, tmp_path):
    transport = LoseFirstAnswer()
    with ServiceClient(api_url, USER_KEY, transport=transport) as client:
        record = client.upload_dataset(tiny_npz(tmp_path / "lost.npz"), name="lost-answer")
        stored = [d for d in client.list_datasets() if d["name"] == "lost-answer"]
    assert len(transport.posts) == 2 and transport.posts[0] == transport.posts[1] is not None
    assert [d["id"] for d in stored] == [record["id"]]  # the retry got the first upload back


def test_a_refusal_without_retry_after_is_not_retried(api_url, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with ServiceClient(api_url, USER_KEY) as client, pytest.raises(ClientError) as caught:
        client.upload_dataset(bad)
    assert caught.value.status_code == 422 and caught.value.retry_after is None


def test_wait_rides_out_a_redis_restart_and_gives_up_after_max_outage(tmp_path):
    server = RedisServer(tmp_path / "redis", persist=True).start()
    proc, url = start_api(stack_env(server.url, tmp_path / "data"), tmp_path / "api.log")
    try:
        jobs = JobStore(redis.Redis.from_url(server.url))
        first, second = new_job_id(), new_job_id()
        jobs.create(first, "certify", {})
        jobs.create(second, "certify", {})
        time.sleep(1.5)  # the append-only file is fsynced every second
        outcome: dict = {}
        with ServiceClient(url, USER_KEY) as client:
            waiter = threading.Thread(
                target=lambda: outcome.update(
                    record=client.wait(first, timeout=90, max_outage_s=60)
                )
            )
            waiter.start()
            time.sleep(0.5)
            server.process.kill()
            server.process.wait()
            server.process = None
            time.sleep(2)  # polls meanwhile get 503
            server = RedisServer(
                tmp_path / "redis", port=server.port, persist=True, password=server.password
            ).start()
            jobs = JobStore(redis.Redis.from_url(server.url))
            assert jobs.start(first) == 1 and jobs.succeed(first, {"results": []})
            waiter.join(60)
            assert outcome["record"]["status"] == "succeeded"

            def wait_second():
                try:
                    client.wait(second, timeout=90, max_outage_s=1)
                except ClientError as exc:
                    outcome["error"] = exc

            waiter = threading.Thread(target=wait_second)
            waiter.start()
            time.sleep(0.5)
            server.process.kill()
            server.process.wait()
            server.process = None
            waiter.join(60)
        assert outcome["error"].status_code == 503 and "unreachable" in str(outcome["error"])
    finally:
        stop_process(proc)
        server.stop()
