"""What a client can do to the API's connections and log without a key, on a real API process
(python -m smoothcert.service.api.server, as `smoothcert up` and the image start it) reached over
raw sockets on loopback: slow or unfinished headers, a trickled body and idle connections are
closed within their deadlines, connections past the bound are answered 503, and a request writes
one short log line however long its path, method or headers."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.stack import USER_KEY, stack_env, start_api, stop_process, wait_for

pytestmark = pytest.mark.process

HEADER_S, BODY_S, MIN_RATE, KEEP_ALIVE_S, MAX_CONCURRENCY = 1.0, 1.0, 2000, 1, 8
SLACK_S = 1.5  # timers fire on a loaded machine a little late
AUTH = f"Authorization: Bearer {USER_KEY}\r\n".encode()


class Api:
    def __init__(self, url: str, log: Path):
        self.url, self.log = url, log
        self.port = int(url.rsplit(":", 1)[1])

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


@pytest.fixture(scope="module")
def api(redis_url, tmp_path_factory) -> Iterator[Api]:
    """An API with deadlines of a second, on the session's Redis (it creates no job here)."""
    data = tmp_path_factory.mktemp("connections")
    env = stack_env(
        redis_url,
        data,
        SMOOTHCERT_HTTP_HEADER_TIMEOUT_S=str(HEADER_S),
        SMOOTHCERT_HTTP_BODY_TIMEOUT_S=str(BODY_S),
        SMOOTHCERT_HTTP_BODY_MIN_BYTES_PER_S=str(MIN_RATE),
        SMOOTHCERT_HTTP_KEEP_ALIVE_S=str(KEEP_ALIVE_S),
        SMOOTHCERT_HTTP_MAX_CONCURRENCY=str(MAX_CONCURRENCY),
    )
    proc, url = start_api(env, data / "api.log")
    yield Api(url, data / "api.log")
    stop_process(proc)


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float | None]:
    """What the server sends until it closes the connection, and how long that took (None: still
    open after ``limit_s``)."""
    sock.settimeout(limit_s)
    started, got = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except socket.timeout:
        return got, None
    except ConnectionResetError:
        pass
    return got, time.monotonic() - started


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


# --- deadlines ---------------------------------------------------------------------------------


def test_unfinished_headers_get_408_and_the_connection_closes(api):
    """50 connections trickle their headers a line at a time, slower than the deadline allows."""

    def slowloris(_) -> tuple[bytes, float | None]:
        with api.connect() as sock:
            opened = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            sock.settimeout(0.3)
            for i in range(40):  # one header every 0.3 s, never the blank line that ends them
                try:
                    sock.sendall(f"X-Slow-{i}: 1\r\n".encode())
                    sock.recv(1, socket.MSG_PEEK)
                    break  # an answer came, or the server closed
                except socket.timeout:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
            answer, _ = read_until_closed(sock, 5)
            return answer, time.monotonic() - opened

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(slowloris, range(50)))
    for answer, took in results:
        assert status_of(answer) == 408, answer[:200]
        assert b"did not arrive within 1 s" in answer and b"nosniff" in answer
        assert HEADER_S - 0.1 <= took <= HEADER_S + SLACK_S, took


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(api):
    with api.connect() as sock:
        answer, took = read_until_closed(sock, 10)
    assert answer == b"" and took is not None and took <= HEADER_S + SLACK_S


def test_an_idle_keep_alive_connection_is_closed(api):
    with api.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer, took = read_until_closed(sock, 10)
    assert status_of(answer) == 200
    assert took is not None and took <= KEEP_ALIVE_S + SLACK_S, took


def certify_head(length: int) -> bytes:
    return (
        b"POST /v1/certify HTTP/1.1\r\nHost: x\r\n"
        + AUTH
        + b"Content-Type: application/json\r\nContent-Length: "
        + str(length).encode()
        + b"\r\n\r\n"
    )


def test_a_trickled_body_is_cut_with_408_and_one_log_line(api):
    """A byte every 0.2 s (5 bytes/s) to a route that reads the body: 408 after one window."""
    seen: dict[str, object] = {}

    def trickle() -> None:
        with api.connect() as sock:
            sock.sendall(certify_head(100_000) + b"{")
            started = time.monotonic()
            sock.settimeout(0.2)
            answer = b""
            while time.monotonic() - started < 10 and not answer:
                try:
                    sock.sendall(b" ")
                    answer = sock.recv(65536)
                except socket.timeout:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
            rest, _ = read_until_closed(sock, 5)
            seen.update(answer=answer + rest, took=time.monotonic() - started)

    line, size = one_new_line(api, trickle)
    answer, took = seen["answer"], seen["took"]
    assert isinstance(answer, bytes) and isinstance(took, float)
    assert status_of(answer) == 408, answer[:300]
    assert b"slower than 2000 bytes/s" in answer
    assert took <= BODY_S + SLACK_S + 0.5, took
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and "exception" not in entry and size <= 300
    assert '"POST /v1/certify HTTP/1.1" 408: the request body arrived slower' in entry["message"]


def test_a_body_trickled_after_the_answer_is_cut(api):
    """Without a key the answer (401) comes before the body; the body still has to keep up."""
    with api.connect() as sock:
        sock.sendall(certify_head(100_000).replace(AUTH, b"") + b"{")
        sock.settimeout(0.2)
        started, answer = time.monotonic(), b""
        while time.monotonic() - started < 10:
            try:
                sock.sendall(b" ")
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        took = time.monotonic() - started
    assert status_of(answer) == 401
    assert took <= BODY_S + SLACK_S + 0.5, took


def test_a_slow_but_steady_body_is_read_whole(api):
    """4000 bytes/s for 2.5 s, over the floor of 2000: the body arrives and gets its answer."""
    body = json.dumps({"model_id": "x", "inputs": [0.5] * 3000, "padding": "p" * 1000}).encode()
    with api.connect() as sock:
        sock.sendall(certify_head(len(body)))
        for start in range(0, len(body), 1000):
            sock.sendall(body[start : start + 1000])
            time.sleep(0.25)
        answer, _ = read_until_closed(sock, 10)
    assert len(body) > 10_000
    assert status_of(answer) not in (0, 408), answer[:300]


def test_connections_past_the_bound_get_503(api):
    idle = [api.connect() for _ in range(MAX_CONCURRENCY - 1)]
    time.sleep(0.2)  # the server has taken them all in
    try:
        refused = httpx.get(api.url + "/healthz", timeout=5)
    finally:
        for sock in idle:
            sock.close()
    assert refused.status_code == 503
    assert wait_for(
        lambda: httpx.get(api.url + "/healthz", timeout=5).status_code == 200, 10, "a free slot"
    )


# --- log lines ---------------------------------------------------------------------------------


def quiet_log(api: Api, quiet_s: float = 0.5) -> int:
    """How many lines the API's log has once none came for ``quiet_s`` (a line is written after its
    answer is sent, so an earlier test's last request may still be on its way)."""
    count = len(api.lines())
    while True:
        time.sleep(quiet_s)
        now = len(api.lines())
        if now == count:
            return count
        count = now


def one_new_line(api: Api, send) -> tuple[str, int]:
    """Run ``send()``; the line it added to the API's log and the bytes it added."""
    before_lines = quiet_log(api)
    before_bytes = api.log.stat().st_size
    send()
    wait_for(lambda: len(api.lines()) > before_lines, 10, "the request's log line")
    time.sleep(0.2)  # anything else it writes
    added = api.lines()[before_lines:]
    assert len(added) == 1, added
    return added[0], api.log.stat().st_size - before_bytes


def raw_request(api: Api, request: bytes) -> bytes:
    with api.connect() as sock:
        sock.sendall(request)
        answer, _ = read_until_closed(sock, 10)
    return answer


LONG = 15_000


@pytest.mark.parametrize(
    "name, request_bytes",
    [
        ("job path, no key", b"GET /v1/jobs/" + b"a" * LONG + b" HTTP/1.1\r\nHost: x\r\n"),
        ("job path, key", b"GET /v1/jobs/" + b"a" * LONG + b" HTTP/1.1\r\nHost: x\r\n" + AUTH),
        ("unknown path", b"GET /" + b"b" * LONG + b" HTTP/1.1\r\nHost: x\r\n"),
        ("query", b"GET /healthz?q=" + b"c" * LONG + b" HTTP/1.1\r\nHost: x\r\n"),
        ("method", b"D" * LONG + b" /healthz HTTP/1.1\r\nHost: x\r\n"),
        ("forwarded for", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: " + b"e" * LONG),
    ],
)
def test_a_long_request_writes_one_short_log_line(api, name, request_bytes):
    request = request_bytes + (b"" if request_bytes.endswith(b"\r\n") else b"\r\n")
    request += b"Connection: close\r\n\r\n"
    answer: list[bytes] = []
    line, size = one_new_line(api, lambda: answer.append(raw_request(api, request)))
    assert status_of(answer[0]) in (200, 401, 404, 405), answer[0][:200]
    assert size <= 300, (size, line[:300])
    entry = json.loads(line)
    assert entry["logger"] == "smoothcert.access" and "job_id" not in entry


def test_the_line_names_the_route_and_only_a_valid_job_id(api):
    job_id = str(uuid.uuid4())
    line, _ = one_new_line(
        api,
        lambda: raw_request(
            api,
            f"GET /v1/jobs/{job_id} HTTP/1.1\r\nHost: x\r\n".encode()
            + AUTH
            + b"Connection: close\r\n\r\n",
        ),
    )
    entry = json.loads(line)
    assert entry["job_id"] == job_id and job_id not in entry["message"]
    assert '"GET /v1/jobs/{job_id} HTTP/1.1" 404' in entry["message"]
    line, _ = one_new_line(
        api,
        lambda: raw_request(
            api,
            f"GET /v1/jobs/{job_id}x HTTP/1.1\r\nHost: x\r\n".encode()
            + AUTH
            + b"Connection: close\r\n\r\n",
        ),
    )
    assert "job_id" not in json.loads(line)


def test_a_client_gone_mid_body_is_one_line_without_a_traceback(api):
    def send_half_and_go() -> None:
        with api.connect() as sock:
            sock.sendall(certify_head(1000) + b'{"model_id": ')
            time.sleep(0.3)

    line, size = one_new_line(api, send_half_and_go)
    entry = json.loads(line)
    assert entry["level"] == "INFO" and "exception" not in entry, line[:300]
    assert '"POST /v1/certify HTTP/1.1" gone before its request body arrived' in entry["message"]
    assert size <= 300
