"""Log lines of the API and the workers: one JSON object per line, each naming its job.

A job's story spans two processes (the request that created it, the worker that ran it, the
polls); the job id on every line lets one ``grep`` or one log query tell it. The id comes from
:data:`JOB_ID`, a context variable: the API sets it per request (:class:`JobIdMiddleware`, from
``/v1/jobs/{job_id}`` paths and from the ``Location`` of a submission's answer), the worker per
task (:func:`install_worker_hooks`; every task's first argument is its job id). Lines logged
outside a job omit ``job_id``. ``SMOOTHCERT_LOG_FORMAT=text`` gives one readable line instead,
``SMOOTHCERT_LOG_LEVEL`` the threshold. Not everything a worker prints goes through Python's
logging (Celery's warnings and shutdown lines, billiard's notes on pool processes, onnxruntime's
C++ messages written straight to file descriptor 2), so a JSON worker captures its descriptors 1
and 2 (:func:`capture_output`) and every line comes out a JSON object. Torch-free.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
from contextvars import ContextVar, Token
from datetime import datetime, timezone
from typing import Any

from celery.signals import setup_logging, task_postrun, task_prerun

from smoothcert.service.core.jobs import is_job_id
from smoothcert.service.core.settings import Settings

JOB_ID: ContextVar[str | None] = ContextVar("smoothcert_job_id", default=None)
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
_JOB_PATH = re.compile(r"^/v1/jobs/([^/?#]+)")


def job_id_of_task(task_id: str) -> str:
    """The job a Celery task id belongs to: the id itself, or ``<job>`` of a chunk's ``<job>.<index>``."""
    return task_id.split(".", 1)[0]


def current_job_id(record: logging.LogRecord) -> str | None:
    """``record``'s job: an explicit ``extra={"job_id": ...}``, the context variable, or the task id
    of Celery's own lines about a task (``received``, ``succeeded``) logged outside it."""
    explicit = getattr(record, "job_id", None)
    if explicit:
        return str(explicit)
    if JOB_ID.get():
        return JOB_ID.get()
    data = getattr(record, "data", None)
    if isinstance(data, dict) and data.get("id"):
        return job_id_of_task(str(data["id"]))
    return None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO-8601 UTC), level, logger, message, role, job_id, exception."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "role": self.role,
        }
        job_id = current_job_id(record)
        if job_id:
            entry["job_id"] = job_id
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):  # smoothcert.audit's fields (service/api/audit.py)
            entry["audit"] = audit
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``2024-01-01 12:00:00,000 INFO api smoothcert.service [job <id>]: message``."""

    def __init__(self, role: str):
        super().__init__("%(asctime)s %(levelname)s %(role)s %(name)s%(job)s: %(message)s")
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        record.role = self.role
        job_id = current_job_id(record)
        record.job = f" [job {job_id}]" if job_id else ""
        return super().format(record)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(settings: Settings, role: str) -> logging.Handler:
    """Send every logger's lines through one stderr handler in ``settings.log_format`` at
    ``settings.log_level``; ``role`` is "api" or "worker". Calling it again replaces the handler
    (other handlers on the root, such as a test runner's, stay). uvicorn's loggers lose their own
    handlers and propagate to it, so their lines look the same; one uvicorn disabled stays so."""
    level = logging.getLevelName(settings.log_level.upper())
    if not isinstance(level, int):
        raise ValueError(f"unknown log level {settings.log_level!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler.setLevel(level)
    handler.setFormatter(
        JsonFormatter(role) if settings.log_format == "json" else TextFormatter(role)
    )
    root.addHandler(handler)
    root.setLevel(level)
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        if logger.handlers:
            logger.handlers.clear()
            logger.propagate = True
    return handler


def _job_id_in(path: str) -> str | None:
    """The job id a ``/v1/jobs/<id>`` path names, when it is one (:func:`is_job_id`): whatever
    else a caller puts there never reaches a log line."""
    match = _JOB_PATH.match(path)
    return match.group(1) if match and is_job_id(match.group(1)) else None


class JobIdMiddleware:
    """ASGI middleware: sets :data:`JOB_ID` for a request on a ``/v1/jobs/{job_id}`` path whose id
    is a job id, and from the ``Location: /v1/jobs/<id>`` of the answer that created a job, when
    the response starts (in the app's context, so the access line logged after it has the id)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = JOB_ID.set(_job_id_in(scope.get("path", "")))

        async def send_with_job(message):
            if message["type"] == "http.response.start" and not JOB_ID.get():
                location = (
                    dict(message.get("headers") or ()).get(b"location", b"").decode("latin-1")
                )
                created = _job_id_in(location)
                if created:
                    JOB_ID.set(created)
            await send(message)

        try:
            await self.app(scope, receive, send_with_job)
        finally:
            JOB_ID.reset(token)


_task_tokens: dict[str, Token] = {}


def _enter_job(task_id: str | None = None, args: Any = None, **_: Any) -> None:
    job_id = (
        args[0]
        if args and isinstance(args[0], str)
        else (job_id_of_task(task_id) if task_id else None)
    )
    token = JOB_ID.set(job_id)
    if task_id:
        _task_tokens[task_id] = token


def _leave_job(task_id: str | None = None, **_: Any) -> None:
    token = _task_tokens.pop(task_id, None) if task_id else None
    try:
        if token is not None:
            JOB_ID.reset(token)
            return
    except ValueError:  # set in another context (another thread of a thread pool)
        pass
    JOB_ID.set(None)


def install_worker_hooks(settings: Settings) -> None:
    """In a worker: Celery configures logging through :func:`configure_logging` (in the main and
    in each pool process), and every task runs with :data:`JOB_ID` set to its first argument."""

    def setup(**_: Any) -> None:
        configure_logging(settings, "worker")

    setup_logging.connect(setup, weak=False, dispatch_uid="smoothcert.logs.setup_logging")
    task_prerun.connect(_enter_job, weak=False, dispatch_uid="smoothcert.logs.enter_job")
    task_postrun.connect(_leave_job, weak=False, dispatch_uid="smoothcert.logs.leave_job")


_SENTINEL = b"\x00smoothcert-output-drained\x00\n"
_captured: list[int] = []


def capture_output(role: str) -> None:
    """Send everything written to this process's file descriptors 1 and 2 (and its children's,
    which inherit them) through a pipe to a reader thread that writes it to the original
    descriptor 2: a line that is a JSON object as it is, any other line wrapped as one
    (``logger`` "stdout" or "stderr", level INFO or WARNING, ``role``). Call it once, early, in
    the process that forks the others; at exit the lines written so far are written out. A
    second call does nothing."""
    if _captured:
        return
    _captured.append(os.getpid())
    out = os.dup(2)
    lock = threading.Lock()
    drained = threading.Event()
    for fd, (name, level) in ((1, ("stdout", "INFO")), (2, ("stderr", "WARNING"))):
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        threading.Thread(
            target=_relay,
            args=(read_end, out, lock, name, level, role, drained),
            name=f"smoothcert-{name}",
            daemon=True,
        ).start()

    def drain() -> None:
        if os.getpid() != _captured[0]:
            return  # a forked pool process: its lines go to the same pipe, read by its parent
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            os.write(2, _SENTINEL)
        except OSError:
            return
        drained.wait(2.0)

    atexit.register(drain)


def _relay(
    read_end: int,
    out: int,
    lock: threading.Lock,
    name: str,
    level: str,
    role: str,
    drained: threading.Event,
) -> None:
    with os.fdopen(read_end, "rb") as lines:
        for raw in lines:
            if raw == _SENTINEL:
                drained.set()
                continue
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not text.strip():
                continue
            if not _is_json_object(text):
                text = json.dumps(
                    {
                        "time": datetime.now(timezone.utc)
                        .isoformat(timespec="milliseconds")
                        .replace("+00:00", "Z"),
                        "level": level,
                        "logger": name,
                        "message": _ANSI.sub("", text),
                        "role": role,
                    },
                    ensure_ascii=False,
                )
            data = memoryview(text.encode("utf-8") + b"\n")
            with lock:
                while data:
                    data = data[os.write(out, data) :]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # onnxruntime colours its messages


def _is_json_object(text: str) -> bool:
    if not text.startswith("{"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
