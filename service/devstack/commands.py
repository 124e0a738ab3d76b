"""The command lines that start the stack's servers, run with this interpreter.

Named by module path, not imported: the dev stack never imports the worker's code.
"""

from __future__ import annotations

import sys

API_SERVER_MODULE = "smoothcert.service.api.server"
WORKER_MODULE = "smoothcert.worker.queue.celery_app"


def api_command(host: str, port: int) -> list[str]:
    """The API's server (uvicorn with deadlines on slow clients, smoothcert.service.api.server)
    on ``host:port``; the API image runs the same module."""
    return [sys.executable, "-m", API_SERVER_MODULE, "--host", host, "--port", str(port)]


def worker_command(*options: str) -> list[str]:
    """A Celery worker of the service; ``options`` go to ``celery worker``."""
    return [sys.executable, "-m", WORKER_MODULE, *options]
