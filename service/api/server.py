"""The API's HTTP server: uvicorn with deadlines on what a client sends.

``python -m smoothcert.service.api.server --host H --port P`` serves the app factory
(``smoothcert.service.app:create_app``); ``smoothcert up`` and the API image both start it this
way (``service/devstack/commands.py:api_command``, ``docker/api.Dockerfile``), with every figure
from the ``SMOOTHCERT_HTTP_*`` settings:

- uvicorn's own bounds: idle keep-alive connections close after ``SMOOTHCERT_HTTP_KEEP_ALIVE_S``,
  and a request that arrives while ``SMOOTHCERT_HTTP_MAX_CONCURRENCY`` connections are open (or
  requests in progress) is answered 503.
- What uvicorn lacks: a deadline for the request line and headers, and a floor on the rate of a
  body. uvicorn's only timer is the keep-alive one, armed after a response and cancelled by any
  byte; a connection that never finishes its headers, sends nothing at all, or trickles its body
  stays open until the client goes (hypercorn's ``read_timeout`` is per read as well, so a byte
  every few seconds defeats it; gunicorn's ``--timeout`` watches its workers, not clients).
  :class:`GuardedH11Protocol` adds both to uvicorn's h11 protocol: headers must be complete
  within ``SMOOTHCERT_HTTP_HEADER_TIMEOUT_S`` of the connection opening (or of the first byte
  after the previous answer), else 408 and the connection closes (without an answer when
  nothing was sent); a body still arriving is judged every ``SMOOTHCERT_HTTP_BODY_TIMEOUT_S``
  seconds of reading and must have brought ``SMOOTHCERT_HTTP_BODY_MIN_BYTES_PER_S`` on average,
  else 408 (or, once the app has answered, the connection is closed). Time the server itself
  stops reading (the app has not taken what arrived, or it has not asked for a body sent with
  ``Expect: 100-continue``) does not count against the client.

The protocol is always h11 (never httptools, whose parser the guard does not wrap) and WebSocket
upgrades are off (the API has none). uvicorn's access lines are off: the app writes its own
(:mod:`smoothcert.service.api.access_log`), with the route template instead of the raw path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any, ClassVar, NamedTuple

import h11
import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol

from smoothcert.service.api.access_log import CUT_KEY
from smoothcert.service.core.settings import Settings

APP_FACTORY = "smoothcert.service.app:create_app"
log = logging.getLogger("smoothcert.http")


class Deadlines(NamedTuple):
    """What :class:`GuardedH11Protocol` allows a client (the ``SMOOTHCERT_HTTP_*`` settings)."""

    header_s: float = 10.0
    body_s: float = 20.0
    body_min_bytes_per_s: int = 4096

    @classmethod
    def of(cls, settings: Settings) -> Deadlines:
        return cls(
            settings.http_header_timeout_s,
            settings.http_body_timeout_s,
            settings.http_body_min_bytes_per_s,
        )


def _answer_408(detail: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"x-content-type-options", b"nosniff"),
    ]
    return headers, body


class _ReadClock(FlowControl):
    """uvicorn's flow control, also adding up how long reading was paused by the server."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__(transport)
        self._paused_s = 0.0
        self._paused_at: float | None = None

    def pause_reading(self) -> None:
        if not self.read_paused:
            self._paused_at = time.monotonic()
        super().pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self._paused_at is not None:
            self._paused_s += time.monotonic() - self._paused_at
            self._paused_at = None
        super().resume_reading()

    def paused_s(self) -> float:
        """Seconds spent paused so far, the pause going on included."""
        now = time.monotonic()
        return self._paused_s + (now - self._paused_at if self._paused_at is not None else 0.0)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request headers and a floor on the body's
    rate (the module's docstring). :func:`guarded_protocol` makes one with given figures."""

    deadlines: ClassVar[Deadlines] = Deadlines()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._received = 0  # bytes read on this connection
        # the body window being judged: bytes read, time and paused time when it started
        self._window: tuple[int, float, float] = (0, 0.0, 0.0)

    # --- uvicorn's protocol, with the timers ------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _ReadClock(transport)
        self._follow_state()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        super().data_received(data)  # cancels the keep-alive timer, parses what it can
        self._follow_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms the keep-alive timer; may start a pipelined request
        self._follow_state()

    # --- the timers ---------------------------------------------------------------------------

    def _follow_state(self) -> None:
        """Waiting for a request and no keep-alive timer (a new connection, or bytes of a request
        have come): the header deadline runs. A body arriving: its rate is judged. Neither: no timer."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._header_timer is None and self.timeout_keep_alive_task is None:
                self._header_timer = self.loop.call_later(
                    self.deadlines.header_s, self._headers_late
                )
        elif self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if state is h11.SEND_BODY:
            if self._body_timer is None:
                self._start_body_window()
        elif self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a request: say why it is closed
            s = self.deadlines.header_s
            log.warning("%s: request headers not complete within %g s; 408", self._peer(), s)
            headers, body = _answer_408(
                f"the request line and headers did not arrive within {s:g} s"
            )
            head = b"HTTP/1.1 408 Request Timeout\r\n" + b"".join(
                name + b": " + value + b"\r\n" for name, value in headers
            )
            self.transport.write(head + b"\r\n" + body)
        self.transport.close()  # a connection that sent nothing closes quietly, as an idle one

    def _start_body_window(self) -> None:
        self._window = (self._received, time.monotonic(), self._paused_s())
        self._body_timer = self.loop.call_later(self.deadlines.body_s, self._judge_body)

    def _paused_s(self) -> float:
        return self.flow.paused_s() if isinstance(self.flow, _ReadClock) else 0.0

    def _judge_body(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        if self.cycle is not None and self.cycle.waiting_for_100_continue:
            self._start_body_window()  # the client waits for the app to ask for the body
            return
        mark, started, paused = self._window
        reading_s = time.monotonic() - started - (self._paused_s() - paused)
        if reading_s < self.deadlines.body_s:  # the server paused reading: the client may catch up
            self._body_timer = self.loop.call_later(
                self.deadlines.body_s - reading_s, self._judge_body
            )
            return
        if self._received - mark >= self.deadlines.body_min_bytes_per_s * self.deadlines.body_s:
            self._start_body_window()
            return
        self._cut_body()

    def _cut_body(self) -> None:
        d = self.deadlines
        why = f"the request body arrived slower than {d.body_min_bytes_per_s} bytes/s over {d.body_s:g} s"
        cycle = self.cycle
        if (
            cycle is not None
            and not cycle.response_started
            and self.conn.our_state is h11.SEND_RESPONSE
        ):
            # The app waits for the body: it sees the client gone (and writes the one line about
            # the request, with CUT_KEY's reason), and its answer, if any, is dropped.
            cycle.scope[CUT_KEY] = why  # type: ignore[literal-required]
            cycle.disconnected = True
            cycle.message_event.set()
            headers, body = _answer_408(why)
            response = h11.Response(status_code=408, headers=headers, reason=b"Request Timeout")
            for event in (response, h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event) or b"")
        else:  # answered already: the client keeps sending what nobody reads
            log.warning("%s: %s after its answer; closed", self._peer(), why)
        self.transport.close()

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "a client"


def guarded_protocol(deadlines: Deadlines) -> type[GuardedH11Protocol]:
    """:class:`GuardedH11Protocol` with ``deadlines``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"deadlines": deadlines})


def server_config(settings: Settings, host: str, port: int) -> uvicorn.Config:
    """uvicorn's configuration of the API on ``host:port`` with the ``SMOOTHCERT_HTTP_*`` figures."""
    return uvicorn.Config(
        APP_FACTORY,
        factory=True,
        host=host,
        port=port,
        http=guarded_protocol(Deadlines.of(settings)),
        ws="none",
        timeout_keep_alive=settings.http_keep_alive_s,
        limit_concurrency=settings.http_max_concurrency,
        access_log=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smoothcert.service.api.server",
        description="Serve the smoothcert API (settings from the SMOOTHCERT_* environment).",
    )
    parser.add_argument("--host", help="address to listen on (default: SMOOTHCERT_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (default: SMOOTHCERT_PORT)")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"smoothcert API: invalid settings: {exc}", file=sys.stderr)
        return 1
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    server = uvicorn.Server(server_config(settings, host, port))
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
