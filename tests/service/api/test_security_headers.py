"""Every answer of the API says ``X-Content-Type-Options: nosniff``, and no page of it can be
framed by another site: the web page, /docs and /redoc carry ``frame-ancestors 'none'`` in their
Content-Security-Policy and ``X-Frame-Options: DENY``, their own policies kept."""

from __future__ import annotations

import socket

import pytest

PAGES = ["/", "/docs", "/redoc", "/docs/oauth2-redirect"]
OTHERS = [
    "/healthz",
    "/openapi.json",
    "/metrics",
    "/ui/app.js",
    "/ui/style.css",
    "/static/docs/swagger-ui-bundle.js",
    "/v1/models",  # 401 without a key
    "/v1/jobs/not-a-job",  # 401
    "/no-such-page",  # 404
]


@pytest.mark.parametrize("path", PAGES + OTHERS)
def test_every_answer_says_nosniff_and_cannot_be_framed(anonymous, path):
    resp = anonymous.get(path)
    assert resp.status_code in (200, 401, 404), (path, resp.status_code)
    assert resp.headers.get_list("x-content-type-options") == ["nosniff"]
    assert resp.headers["x-frame-options"] == "DENY"
    [policy] = resp.headers.get_list("content-security-policy")
    assert "frame-ancestors 'none'" in [d.strip() for d in policy.split(";")]


def test_the_pages_keep_their_own_policies(anonymous):
    assert "default-src 'self'" in anonymous.get("/").headers["content-security-policy"]
    assert (
        "img-src 'self' data: blob:" in anonymous.get("/redoc").headers["content-security-policy"]
    )


def test_an_answer_before_the_body_is_read_says_nosniff_too(api_url):
    """413 from the body limit (a declared length over the cap), before any route runs."""
    host, port = api_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/certify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1099511627776\r\nConnection: close\r\n\r\n{"
        )
        head = sock.recv(65536).split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 413 ")
    assert b"\r\nx-content-type-options: nosniff" in head
