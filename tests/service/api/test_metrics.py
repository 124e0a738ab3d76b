"""/metrics: valid Prometheus text, counters that move with requests and jobs, the jobs-by-state
bookkeeping of the job scripts (expired records included), and 200 with redis_up 0 without Redis."""

from __future__ import annotations

import math
import re

import httpx
import numpy as np
import pytest

from smoothcert.service.api.metrics import (
    Family,
    HttpMetrics,
    job_counts,
    queue_depths,
    render,
    samples,
)
from smoothcert.service.core.job_chunks import ChunkLedger
from smoothcert.service.core.jobs import JobStore, new_job_id
from smoothcert.service.core.queue import QUEUE, TRAIN_QUEUE
from smoothcert.service.core.samples import record_samples, samples_drawn
from tests.support.stack import scratch_db, wait_for, wait_job

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Samples of a text exposition by (name, labels); fails on anything the format forbids."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert name not in types, f"family {name} declared twice"
            types[name] = kind
            continue
        if line.startswith("# HELP ") or not line:
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels_text, value = m.groups()
        family = next((f for f, k in types.items() for s in _SUFFIXES[k] if name == f + s), None)
        assert family is not None, f"{name} has no TYPE line before it"
        labels = {}
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = _LABEL.match(labels_text, pos)
                assert lm, f"bad labels in {line!r}"
                labels[lm.group(1)] = re.sub(
                    r"\\(.)", lambda e: {"n": "\n"}.get(e.group(1), e.group(1)), lm.group(2)
                )
                pos = lm.end()
        key = (name, frozenset(labels.items()))
        assert key not in out, f"duplicate sample {line!r}"
        out[key] = float(value.replace("+Inf", "inf"))
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def scrape(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(resp.text)


# ---------------------------------------------------------------- units


def test_render_escapes_labels_and_the_parser_reads_them_back():
    text = render(
        [
            Family("x_total", "counter", "a help\nline").add(3, route='a "b" \\ c\nd'),
            Family("y", "gauge", "g").add(0.25).add(float("inf"), kind="k"),
        ]
    )
    assert value(parse(text), "x_total", route='a "b" \\ c\nd') == 3
    assert value(parse(text), "y") == 0.25 and math.isinf(value(parse(text), "y", kind="k"))
    with pytest.raises(AssertionError):
        parse("z 1\n")  # no TYPE line


def test_http_histogram_is_cumulative_and_methods_are_bounded():
    http = HttpMetrics(buckets=(0.1, 1.0))
    for seconds in (0.05, 0.5, 5.0):
        http.observe("GET", "/v1/jobs/{job_id}", 200, seconds)
    http.observe("BREW", "other", 405, 0.0)
    m = parse(render(http.families()))
    labels = {"method": "GET", "route": "/v1/jobs/{job_id}"}
    assert [
        value(m, "smoothcert_http_request_duration_seconds_bucket", **labels, le=le)
        for le in ("0.1", "1", "+Inf")
    ] == [1, 2, 3]
    assert value(m, "smoothcert_http_request_duration_seconds_sum", **labels) == pytest.approx(5.55)
    assert value(m, "smoothcert_http_requests_total", **labels, status="200") == 3
    assert (
        value(m, "smoothcert_http_requests_total", method="other", route="other", status="405") == 1
    )


def test_samples_drawn_counts_selection_and_estimation_draws():
    rows = [{"n": 1000}, {"n": 1000}]
    assert samples_drawn(rows, {"mode": "certify", "n0": 100}) == 2200
    assert samples_drawn(rows, {"mode": "predict", "n": 1000}) == 2000
    sequential = [{"n": 300, "samples_used": 400}, {"n": 0, "samples_used": 0}]
    assert samples_drawn(sequential, {"mode": "certify", "n0": 100}) == 400


# ---------------------------------------------------------------- Redis bookkeeping


@pytest.fixture
def own_db(redis_url):
    """A Redis database of the session's server that no worker or API uses."""
    with scratch_db(redis_url, 9) as client:
        yield client


def test_job_scripts_keep_the_state_counts(own_db):
    store = JobStore(own_db, ttl_s=600)
    ledger = ChunkLedger(store)
    a, b, c = new_job_id(), new_job_id(), new_job_id()
    for job in (a, b):
        store.create(job, "certify", {})
    store.create(c, "train", {})
    in_flight, created, finished = job_counts(own_db)
    assert in_flight[("certify", "queued")] == 2 and in_flight[("train", "queued")] == 1
    assert created == {"certify": 2, "train": 1} and finished == {}

    assert store.start(a) == 1 and store.start(a) == 2  # a redelivery is no new start
    assert ledger.start(b, 0) == 1  # a dataset chunk starts its job
    store.request_cancel(c)  # queued: canceled at once
    in_flight, _, finished = job_counts(own_db)
    assert in_flight[("certify", "queued")] == 0 and in_flight[("certify", "running")] == 2
    assert in_flight[("train", "queued")] == 0 and finished == {("train", "canceled"): 1}

    assert store.succeed(a, {"results": []}) and store.fail(b, "boom")
    assert not store.succeed(a, {"results": []})  # no second count for a refused transition
    in_flight, created, finished = job_counts(own_db)
    assert in_flight[("certify", "running")] == 0
    assert finished == {
        ("train", "canceled"): 1,
        ("certify", "succeeded"): 1,
        ("certify", "failed"): 1,
    }
    assert created == {"certify": 2, "train": 1}


def test_a_record_that_expires_in_flight_stops_counting(own_db):
    store = JobStore(own_db, ttl_s=1)
    job = new_job_id()
    store.create(job, "predict", {})
    store.start(job)
    assert job_counts(own_db)[0][("predict", "running")] == 1
    wait_for(lambda: not own_db.exists(store.key(job)), 10, "the record's expiry")
    wait_for(
        lambda: job_counts(own_db)[0][("predict", "running")] == 0, 10, "the running gauge to drop"
    )
    assert store.succeed(job, {}) is False  # the record is gone: nothing moves


def test_queue_depths_read_kombus_lists(own_db):
    # kombu keeps a queue as a list named after it, and one list per priority step above 0.
    own_db.lpush(QUEUE, b"m1", b"m2")
    own_db.lpush(QUEUE + "\x06\x163", b"m3")
    own_db.lpush(TRAIN_QUEUE, b"m4")
    own_db.hset("unacked", "tag", b"m5")
    assert queue_depths(own_db) == ({QUEUE: 3, TRAIN_QUEUE: 1}, 1)


def test_record_samples_adds_up(own_db):
    record_samples(own_db, 1000, 0.5)
    record_samples(own_db, 3000, 1.5)
    record_samples(own_db, 0, 9.0)  # nothing drawn: nothing counted
    assert samples(own_db) == (4000, 2.0)


# ---------------------------------------------------------------- the running stack


def test_metrics_move_with_requests_and_a_finished_job(anonymous, client, demo_model):
    before = scrape(anonymous)
    assert client.get("/v1/jobs/no-such-job").status_code == 404
    assert anonymous.get("/no/such/path").status_code == 404
    inputs = np.full((3, 1, 8, 8), 0.5).tolist()
    resp = client.post(
        "/v1/certify",
        json={
            "model_id": demo_model["id"],
            "inputs": inputs,
            "sigma": 0.25,
            "n0": 20,
            "n": 200,
            "seed": 1,
        },
    )
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"])
    assert job["status"] == "succeeded"
    after = scrape(anonymous)

    grew = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert (
        grew(
            "smoothcert_http_requests_total", method="GET", route="/v1/jobs/{job_id}", status="404"
        )
        == 1
    )
    assert grew("smoothcert_http_requests_total", method="GET", route="other", status="404") == 1
    assert (
        grew("smoothcert_http_requests_total", method="POST", route="/v1/certify", status="202")
        == 1
    )
    assert grew("smoothcert_http_requests_total", method="GET", route="/metrics", status="200") >= 1
    assert (
        grew("smoothcert_http_request_duration_seconds_count", method="POST", route="/v1/certify")
        == 1
    )
    assert not any(dict(labels).get("route") == "/v1/jobs/no-such-job" for _, labels in after)

    assert grew("smoothcert_jobs_created_total", kind="certify") >= 1
    assert grew("smoothcert_jobs_finished_total", kind="certify", status="succeeded") >= 1
    for state in ("queued", "running"):
        assert value(after, "smoothcert_jobs", kind="certify", status=state) >= 0
    assert ("smoothcert_jobs", frozenset({("kind", "certify"), ("status", "queued")})) in after
    assert grew("smoothcert_samples_total") >= 3 * (20 + 200)
    assert grew("smoothcert_sampling_seconds_total") > 0
    assert value(after, "smoothcert_samples_per_second") == pytest.approx(
        value(after, "smoothcert_samples_total") / value(after, "smoothcert_sampling_seconds_total")
    )

    for queue in (QUEUE, TRAIN_QUEUE):
        assert ("smoothcert_queue_messages", frozenset({("queue", queue)})) in after
        assert value(after, "smoothcert_queue_messages", queue=queue) >= 0
    assert value(after, "smoothcert_queue_unacked_messages") >= 0
    assert value(after, "smoothcert_workers") >= 1
    assert value(after, "smoothcert_redis_up") == 1


def test_a_body_refused_before_routing_still_counts_under_its_route(anonymous):
    before = scrape(anonymous)
    resp = anonymous.post(
        "/v1/certify", content=b"x" * (300 << 10), headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 413
    after = scrape(anonymous)
    labels = {"method": "POST", "route": "/v1/certify", "status": "413"}
    assert (
        value(after, "smoothcert_http_requests_total", **labels)
        == value(before, "smoothcert_http_requests_total", **labels) + 1
    )


def test_metrics_need_no_key_and_are_documented_as_text(anonymous):
    operation = anonymous.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert "security" not in operation
    assert list(operation["responses"]["200"]["content"]) == ["text/plain"]


def test_without_redis_metrics_answer_with_redis_up_0(api_without_redis):
    with httpx.Client(base_url=api_without_redis, timeout=30) as anonymous:
        before = scrape(anonymous)
        anonymous.get("/healthz")
        m = scrape(anonymous)
    assert value(m, "smoothcert_redis_up") == 0
    labels = {"method": "GET", "route": "/healthz", "status": "200"}
    assert (
        value(m, "smoothcert_http_requests_total", **labels)
        == value(before, "smoothcert_http_requests_total", **labels) + 1
    )
    assert not any(
        name.startswith(("smoothcert_jobs", "smoothcert_workers", "smoothcert_samples"))
        for name, _ in m
    )
