"""Lines about requests that no caller can make long, and headers every answer carries.

:class:`AccessLog` writes one line per request (logger ``smoothcert.access``) when it has been
answered: ``127.0.0.1:51234 - "GET /v1/jobs/{job_id} HTTP/1.1" 200 3 ms``. The path is the route
template the request matched (``other`` when none did), never the path the client sent, and the
method and the client address are cut to :data:`MAX_FIELD` characters; the job id comes from
:class:`~smoothcert.service.core.logs.JobIdMiddleware`, which sets it only for a valid job id.
A 15 KB path costs the same line as a short one. A client that goes away before its request
body has arrived is one INFO line as well, not a traceback at ERROR; one whose body the server
cut for being too slow (:mod:`smoothcert.service.api.server`, which says so under
:data:`CUT_KEY` in the request's scope) is one WARNING line with the 408 and the reason.

:class:`SecurityHeaders` adds ``X-Content-Type-Options: nosniff`` to every answer, and keeps
every page from being framed by another site: ``X-Frame-Options: DENY`` and, on an answer without
a Content-Security-Policy of its own, ``Content-Security-Policy: frame-ancestors 'none'`` (the
web page's and ReDoc's own policies say ``frame-ancestors 'none'`` themselves).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable

from starlette.requests import ClientDisconnect

from smoothcert.service.api.metrics import RouteTemplates, route_label

log = logging.getLogger("smoothcert.access")
# Set in a request's scope by the API's server when it cut the body (smoothcert.service.api.server).
CUT_KEY = "smoothcert.cut"
MAX_FIELD = 64
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")


def bounded(text: str, limit: int = MAX_FIELD) -> str:
    """``text`` with anything but printable ASCII replaced by ``?``, cut to ``limit`` characters."""
    text = _UNPRINTABLE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def route_template(scope: dict, templates: list[tuple[re.Pattern, str]]) -> str:
    """The route the request matched (``/v1/jobs/{job_id}``), ``<mount>/{path}`` for a file of a
    mounted folder (``/ui/{path}``), else :func:`route_label`'s match of ``templates`` or ``other``."""
    if scope.get("route") is None and "app_root_path" in scope:  # set by a Mount it went through
        mount = scope.get("root_path", "")[len(scope["app_root_path"]) :]
        if mount:
            return bounded(mount) + "/{path}"
    return route_label(scope, templates)


class AccessLog:
    """ASGI middleware: one bounded line per request (the module's docstring). ``paths()`` gives
    the route templates for requests answered before routing; it is called once, when needed."""

    def __init__(self, app, paths: Callable[[], Iterable[str]]):
        self.app, self.templates = app, RouteTemplates(paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]

        async def note_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, note_status)
        except ClientDisconnect:
            if status[0]:
                raise  # an answer had started: a failure after it, not a client gone early
            if scope.get(CUT_KEY):  # the server cut it (smoothcert.service.api.server)
                log.warning("%s 408: %s", self._request(scope), scope[CUT_KEY])
            else:
                log.info("%s gone before its request body arrived", self._request(scope))
            return
        except Exception:
            status[0] = status[0] or 500  # uvicorn answers 500 and logs the exception
            raise
        finally:
            if status[0]:
                log.info(
                    "%s %d %.0f ms",
                    self._request(scope),
                    status[0],
                    (time.perf_counter() - started) * 1000,
                )

    def _request(self, scope) -> str:
        client = scope.get("client")
        peer = bounded(f"{client[0]}:{client[1]}") if client else "-"
        method = bounded(str(scope.get("method", "")), 16)
        version = bounded(str(scope.get("http_version", "")), 8)
        route = route_template(scope, self.templates() if scope.get("route") is None else [])
        return f'{peer} - "{method} {route} HTTP/{version}"'


FRAME_ANCESTORS_NONE = "frame-ancestors 'none'"


class SecurityHeaders:
    """ASGI middleware: ``nosniff`` on every answer, and no framing (the module's docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or ())
                names = {name.lower() for name, _ in headers}
                if b"x-content-type-options" not in names:
                    headers.append((b"x-content-type-options", b"nosniff"))
                if b"x-frame-options" not in names:
                    headers.append((b"x-frame-options", b"DENY"))
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", FRAME_ANCESTORS_NONE.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
