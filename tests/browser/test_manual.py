"""The manual: ``mkdocs build --strict`` builds it with no warning, and the API serves it at
``/manual/`` to a real browser with nothing fetched from elsewhere.

The site is built once for the module into a temporary folder (as ``make docs`` builds ``site/``)
and served by the API's own app (uvicorn in a thread, no Redis: the manual needs none) with
``app.state.manual_dir`` pointed at it. Headless Chromium opens its pages, searches it, and every
request it makes is recorded: all of them go to the API's origin, and the tab's offline routing
(conftest.py) aborts and reports any that would leave the machine. The manual's
Content-Security-Policy allows this origin and the theme's inline scripts by hash only: a script
it refused would be a console error, which the tab fixture fails on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from playwright.sync_api import expect

from smoothcert.service.api.app import create_app
from smoothcert.service.core.settings import Settings
from smoothcert.service.devstack.redis_server import free_port
from tests.support.paths import ROOT

pytestmark = pytest.mark.process  # mkdocs runs as a subprocess


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[Path, str]:
    """The site, built as ``make docs`` builds it, and what the build printed."""
    site = tmp_path_factory.mktemp("manual") / "site"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return site, done.stdout + done.stderr


@pytest.fixture(scope="module")
def manual_api(build, tmp_path_factory) -> Iterator[tuple[str, object]]:
    """An API app serving the built site, on a free port; its URL and the app."""
    settings = Settings(
        env="development",
        api_key="manual-test-key-0123456789",
        data_dir=tmp_path_factory.mktemp("data"),
        redis_url="redis://127.0.0.1:1/0",  # nothing answers: the manual needs no Redis
    )
    app = create_app(settings, configure_logs=False)
    app.state.manual_dir = build[0]
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=10)


def test_the_strict_build_warns_of_nothing(build):
    site, output = build
    assert "WARNING" not in output, output
    for page in ("getting-started", "reference/http-api", "reference/settings", "changelog"):
        assert (site / page / "index.html").is_file()
    # mkdocstrings rendered the client from its docstrings
    assert "submit_job" in (site / "reference/python-client/index.html").read_text()


def test_the_built_site_loads_nothing_from_another_origin(tab, manual_api):
    url, _ = manual_api
    origins: set[str] = set()
    tab.page.on(
        "request", lambda r: origins.add(f"{urlsplit(r.url).scheme}://{urlsplit(r.url).netloc}")
    )
    page = tab.page
    page.goto(url + "/manual/")
    expect(page.locator("h1").first).to_contain_text("smoothcert")
    page.get_by_role("link", name="Getting started").first.click()
    expect(page).to_have_url(url + "/manual/getting-started/")
    expect(page.locator("h1").first).to_contain_text("Getting started")
    page.goto(url + "/manual/reference/http-api/")
    expect(page.locator("#get-v1jobs")).to_be_visible()
    page.goto(url + "/manual/reference/python-client/")
    expect(
        page.locator("[id='smoothcert.service.client.ServiceClient.submit_job']")
    ).to_be_visible()
    # search runs in a web worker over the site's own index
    page.locator("label.md-search__icon, .md-search__input").first.click()
    # The worker loads the index after the page: a query typed before it is ready finds nothing
    # until the next keystroke, so type it again until results show (at most ~30 s).
    box, results = page.locator("input.md-search__input"), page.locator(".md-search-result__item")
    for _ in range(10):
        box.fill("")
        box.press_sequentially("certificate")
        try:
            expect(results.first).to_be_visible(timeout=3000)
            break
        except AssertionError:
            continue
    expect(results.first).to_be_visible()
    expect(results.first).to_contain_text("ertificate")
    assert origins == {url}, f"requests left the origin: {origins - {url}}"
    assert not tab.blocked


def test_the_manual_answers_with_a_strict_policy_and_without_its_files_says_how_to_build_it(
    manual_api, tmp_path
):
    url, app = manual_api
    with httpx.Client(base_url=url, timeout=10) as http:
        page = http.get("/manual/getting-started/")
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "'unsafe-inline'" not in policy and "'sha256-" in policy
        assert page.headers["x-frame-options"] == "DENY"
        assert http.get("/manual").headers["location"] == "/manual/"
        missing = http.get("/manual/no-such-page/")
        assert missing.status_code == 404 and "md-content" in missing.text  # the site's 404 page
        for sneaky in ("/manual/..%2F..%2Fpyproject.toml", "/manual/%2e%2e/%2e%2e/pyproject.toml"):
            answer = http.get(sneaky)
            assert answer.status_code == 404 and "[project]" not in answer.text
        assert 'href="/manual/getting-started/"' in http.get("/").text  # the page links it

        built, app.state.manual_dir = app.state.manual_dir, tmp_path  # nothing built there
        try:
            unbuilt = http.get("/manual/")
        finally:
            app.state.manual_dir = built
        assert unbuilt.status_code == 404
        assert "make docs" in unbuilt.text
        assert "default-src 'self'" in unbuilt.headers["content-security-policy"]
