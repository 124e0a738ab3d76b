"""The command lines that start the stack's servers, run with this interpreter.

Named by module path, not imported: the dev stack never imports the worker's code.
"""

from __future__ import annotations

import sys

API_FACTORY = "smoothcert.service.app:create_app"
WORKER_MODULE = "smoothcert.worker.queue.celery_app"


def api_command(host: str, port: int) -> list[str]:
    """uvicorn serving the API's app factory on ``host:port``."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        API_FACTORY,
        "--factory",
        "--host",
        host,
        "--port",
        str(port),
    ]


def worker_command(*options: str) -> list[str]:
    """A Celery worker of the service; ``options`` go to ``celery worker``."""
    return [sys.executable, "-m", WORKER_MODULE, *options]
