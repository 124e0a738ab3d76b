"""ASGI middleware that answers 413 to request bodies over a size cap, before they are parsed,
and a route class that answers 422 to form bodies FastAPI cannot parse.

A declared ``Content-Length`` over the cap is refused without reading the body; a chunked body is
counted as it arrives and refused once it passes the cap. Caps are per (method, path), with a
default for everything else.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException


class BodySizeLimit:
    def __init__(self, app, default_limit: int, limits: dict[tuple[str, str], int] | None = None):
        self.app, self.default_limit, self.limits = app, default_limit, limits or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.get((scope["method"], scope["path"].rstrip("/")), self.default_limit)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                return await _respond(send, 400, "invalid Content-Length header")
            if too_large:
                return await _respond(send, 413, _message(limit))

        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the app's body parsing; FastAPI turns it into the 413 response.
                    raise HTTPException(413, _message(limit))
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except HTTPException as exc:
            if started or exc.status_code != 413:
                raise
            await _respond(send, 413, exc.detail)


def _message(limit: int) -> str:
    return f"request body exceeds this server's limit of {limit} bytes"


async def _respond(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class UnparsableBodyRoute(APIRoute):
    """A route whose malformed body is a 422, like every other invalid request, not FastAPI's 400.

    FastAPI parses ``Form``/``File`` parameters before the endpoint runs and answers 400 to a
    multipart body it cannot read (no boundary, over 1000 fields or files); the endpoint never
    sees it. Use as ``APIRouter(route_class=UnparsableBodyRoute)``.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parse_errors_are_422(request: Request) -> Response:
            try:
                return await handler(request)
            except HTTPException as exc:
                if exc.status_code != 400:
                    raise
                raise HTTPException(422, f"malformed request body: {exc.detail}") from None

        return parse_errors_are_422
