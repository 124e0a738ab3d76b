"""Log lines: one JSON object each, carrying the job id, in the API's and the worker's logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from celery.signals import task_postrun, task_prerun

from smoothcert.service.core.logs import (
    JOB_ID,
    UVICORN_LOGGERS,
    JobIdMiddleware,
    JsonFormatter,
    TextFormatter,
    configure_logging,
)
from smoothcert.service.core.settings import Settings
from smoothcert.worker.queue import celery_app  # noqa: F401  (installs the worker hooks)
from tests.support.stack import wait_for, wait_job


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test.logs.{id(out)}")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.DEBUG)
    return logger, out


def test_json_lines_carry_the_job_id_of_the_context():
    logger, out = capture(JsonFormatter("worker"))
    logger.info("outside any job")
    token = JOB_ID.set("job-123")
    try:
        logger.warning("two\nlines", extra={})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed %s", "here")
    finally:
        JOB_ID.reset(token)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert (
        "job_id" not in first and first["message"] == "outside any job" and first["level"] == "INFO"
    )
    assert (
        second["job_id"] == "job-123"
        and second["message"] == "two\nlines"
        and second["role"] == "worker"
    )
    assert (
        third["job_id"] == "job-123"
        and third["message"] == "failed here"
        and third["level"] == "ERROR"
    )
    assert "RuntimeError: boom" in third["exception"] and third["logger"] == logger.name
    assert (
        first["time"].endswith("Z")
        and datetime.fromisoformat(first["time"].replace("Z", "+00:00")).tzinfo
    )


def test_celery_lines_about_a_task_name_its_job():
    logger, out = capture(JsonFormatter("worker"))
    logger.info(
        "Task received", extra={"data": {"id": "abc-def.7", "name": "smoothcert.certify_chunk"}}
    )
    logger.info("explicit", extra={"job_id": "xyz"})
    assert [json.loads(line)["job_id"] for line in out.getvalue().splitlines()] == [
        "abc-def",
        "xyz",
    ]


def test_text_format_names_the_job():
    logger, out = capture(TextFormatter("api"))
    token = JOB_ID.set("job-9")
    try:
        logger.info("hello")
    finally:
        JOB_ID.reset(token)
    line = out.getvalue().strip()
    assert line.endswith("INFO api " + logger.name + " [job job-9]: hello")


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (
        list(root.handlers),
        root.level,
        {
            n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
            for n in UVICORN_LOGGERS
        },
    )
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    for name, (handlers, propagate) in saved[2].items():
        logging.getLogger(name).handlers[:], logging.getLogger(name).propagate = handlers, propagate


def test_configure_logging_installs_one_handler_and_takes_over_uvicorn(
    restore_logging, tmp_path, capsys
):
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers, uvicorn_access.propagate = (
        [logging.StreamHandler(io.StringIO())],
        False,
    )
    settings = Settings(data_dir=tmp_path, log_format="text", log_level="WARNING")
    configure_logging(settings, "api")
    handler = configure_logging(settings.model_copy(update={"log_format": "json"}), "api")
    ours = [h for h in logging.getLogger().handlers if type(h) is type(handler)]
    assert ours == [handler] and isinstance(handler.formatter, JsonFormatter)
    assert uvicorn_access.handlers == [] and uvicorn_access.propagate
    uvicorn_access.info("dropped: below WARNING")
    uvicorn_access.warning('127.0.0.1:1 - "GET /x HTTP/1.1" 500')
    lines = [
        json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")
    ]
    assert [(e["logger"], e["role"], e["level"]) for e in lines] == [
        ("uvicorn.access", "api", "WARNING")
    ]


def test_worker_hooks_set_the_job_id_for_each_task():
    assert JOB_ID.get() is None
    task_prerun.send(
        sender=None, task_id="job-1.3", task=None, args=["job-1", {"chunk": 3}], kwargs={}
    )
    assert JOB_ID.get() == "job-1"
    task_postrun.send(
        sender=None, task_id="job-1.3", task=None, args=["job-1", {}], kwargs={}, retval=None
    )
    assert JOB_ID.get() is None


def test_middleware_sets_the_job_id_from_the_path_and_from_location():
    seen = {}
    job, new_job = str(uuid.uuid4()), str(uuid.uuid4())

    async def app(scope, receive, send):
        seen["inside"] = JOB_ID.get()
        location = f"/v1/jobs/{new_job}".encode()
        headers = [(b"location", location)] if scope["path"] == "/v1/certify" else []
        await send({"type": "http.response.start", "status": 202, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def send(message):
        if message["type"] == "http.response.start":
            seen["at_start"] = JOB_ID.get()  # what uvicorn's access line would carry

    async def call(path: str) -> dict:
        seen.clear()
        await JobIdMiddleware(app)(
            {"type": "http", "path": path, "method": "GET", "headers": []}, None, send
        )
        return dict(seen, after=JOB_ID.get())

    assert asyncio.run(call(f"/v1/jobs/{job}/results.tsv")) == {
        "inside": job,
        "at_start": job,
        "after": None,
    }
    assert asyncio.run(call("/v1/certify")) == {
        "inside": None,
        "at_start": new_job,
        "after": None,
    }
    assert asyncio.run(call("/healthz")) == {"inside": None, "at_start": None, "after": None}
    # what a caller writes where an id goes is not a job id, and never reaches a line
    for path in ("/v1/jobs/abc", f"/v1/jobs/{job}x", "/v1/jobs/" + "a" * 15000):
        assert asyncio.run(call(path)) == {"inside": None, "at_start": None, "after": None}


def json_lines(path: Path) -> list[dict]:
    return [
        json.loads(line)
        for line in path.read_text(errors="replace").splitlines()
        if line.startswith("{")
    ]


def test_api_and_worker_logs_carry_the_job_id(client, demo_model, data_dir):
    resp = client.post(
        "/v1/certify",
        json={
            "model_id": demo_model["id"],
            "inputs": np.full((1, 8, 8), 0.5).tolist(),
            "sigma": 0.25,
            "n0": 10,
            "n": 100,
            "seed": 3,
        },
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    assert wait_job(client, job_id)["status"] == "succeeded"

    def worker_lines():
        return [e for e in json_lines(data_dir / "worker.log") if e.get("job_id") == job_id]

    lines = wait_for(
        lambda: [e for e in worker_lines() if "succeeded" in e["message"]],
        30,
        "the worker's line",
        log=data_dir / "worker.log",
    )
    assert all(e["role"] == "worker" and e["time"].endswith("Z") for e in worker_lines())
    assert lines and any("received" in e["message"] for e in worker_lines())

    def api_lines():
        return [e for e in json_lines(data_dir / "api.log") if e.get("job_id") == job_id]

    wait_for(
        lambda: any("GET /v1/jobs/{job_id} " in e["message"] for e in api_lines()),
        30,
        "the access line",
        log=data_dir / "api.log",
    )
    access = [e["message"] for e in api_lines() if e["logger"] == "smoothcert.access"]
    assert any(
        '"POST /v1/certify HTTP/1.1" 202' in m for m in access
    )  # the submission that made it
    assert all(e["role"] == "api" for e in api_lines())


def test_every_line_of_the_api_log_is_json(client, data_dir):
    unknown = str(uuid.uuid4())
    assert client.get(f"/v1/jobs/{unknown}").status_code == 404
    text = (data_dir / "api.log").read_text(errors="replace")
    bad = [line for line in text.splitlines() if line.strip() and not line.startswith("{")]
    assert text.strip() and not bad, bad[:5]
    wait_for(
        lambda: any(e.get("job_id") == unknown for e in json_lines(data_dir / "api.log")),
        10,
        "the access line",
    )
