"""A real browser for the page's end-to-end tests: Debian's headless chromium driven by Playwright.

Playwright is pointed at ``/usr/bin/chromium`` (the Makefile's test set-up installs it) and so
downloads no browser. One browser per module, with a fresh profile folder; each test opens its
own tab, whose session storage (where the page keeps the API key) starts empty. Every tab
records the page's uncaught script errors, and :func:`open_page`'s caller asserts there were
none. The page enforces a same-origin Content-Security-Policy, so the tests read the page with
Playwright's locators and ``expect``, never by evaluating script text in it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import BrowserContext, Page, Route, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
# Flags that run chromium headless as root in a container, with nothing of its own going out.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # generous: two cores are shared by the whole suite
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[BrowserContext]:
    assert CHROMIUM.exists(), (
        "chromium is missing: `make test` installs it (apt-get install chromium)"
    )
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            args=FLAGS,
            headless=True,
            viewport={"width": 1280, "height": 1000},
        )
        context.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        yield context
        context.close()


class Tab:
    """One tab: the page, and the script errors and blocked requests seen in it."""

    def __init__(self, page: Page):
        self.page = page
        self.errors: list[str] = []
        self.blocked: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", self._console)

    def _console(self, message) -> None:
        # What the Content-Security-Policy refused is a bug of the page (an inline script, a CDN).
        if message.type == "error" and "Content Security Policy" in message.text:
            self.errors.append(message.text)

    def offline(self) -> None:
        """Abort every request that leaves this machine, as on a cluster without internet."""

        def route(r: Route) -> None:
            if urlsplit(r.request.url).hostname in LOCAL_HOSTS:
                r.continue_()
            else:
                self.blocked.append(r.request.url)
                r.abort()

        self.page.route("**/*", route)


@pytest.fixture
def tab(browser) -> Iterator[Tab]:
    page = browser.new_page()
    tab = Tab(page)
    tab.offline()
    yield tab
    page.close()
    assert not tab.errors, f"the page threw: {tab.errors}"
    assert not tab.blocked, f"the page asked for resources outside this machine: {tab.blocked}"


def open_page(tab: Tab, api_url: str, key: str) -> Page:
    """The page at ``/`` with ``key`` entered and saved, once its models are listed."""
    page = tab.page
    page.goto(api_url + "/")
    page.get_by_test_id("api-key").fill(key)
    page.get_by_test_id("save-key").click()
    expect(page.get_by_test_id("key-status")).to_have_attribute("data-kind", "ok")
    return page
