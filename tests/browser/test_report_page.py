"""A certified job's report page (``GET /v1/jobs/{id}/report.html``) in a real browser against the
real stack, and the web page's links to it and to the signed certificate.

A small labelled certify job on the demo model; its report, opened with the key as a header,
shows the certificate's SHA-256, the model's and every input's digest and the rows, styled by
``/ui/report.css``, and nothing is requested from another origin. On the web page, the job's
"certificate (JSON)" link saves the envelope's exact bytes and its "report" link opens the same
report in a new tab (fetched with the key, shown from a ``blob:`` URL). Every tab is offline
(conftest.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Page, expect

from smoothcert.service.core.certificates import input_digests
from tests.support.stack import USER_KEY, wait_job

INPUTS = 5
CERTIFICATE_WAIT_S = 60.0


def origin(url: str) -> str:
    """The origin of ``url``; a ``blob:`` URL's is the one it names."""
    parts = urlsplit(url.removeprefix("blob:"))
    return f"{parts.scheme}://{parts.netloc}"


def certificate_of(client: httpx.Client, job_id: str) -> bytes:
    """The job's envelope, once the API has signed it (it signs succeeded jobs as they end)."""
    deadline = time.monotonic() + CERTIFICATE_WAIT_S
    while True:
        resp = client.get(f"/v1/jobs/{job_id}/certificate")
        if resp.status_code == 200:
            return resp.content
        if time.monotonic() > deadline:
            pytest.fail(f"no certificate for job {job_id}: {resp.status_code} {resp.text[:300]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def certified(client, demo_model, digits_test_set) -> dict:
    """A succeeded certify job of the first INPUTS test digits with labels, its envelope's bytes
    and SHA-256, and its statement."""
    x, y = digits_test_set
    resp = client.post(
        "/v1/certify",
        json={
            "model_id": demo_model["id"],
            "inputs": x[:INPUTS].tolist(),
            "labels": y[:INPUTS].tolist(),
            "sigma": 0.25,
            "n0": 20,
            "n": 500,
        },
    )
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"])
    assert job["status"] == "succeeded", job["error"]
    envelope = certificate_of(client, job["id"])
    sha = hashlib.sha256(envelope).hexdigest()
    assert client.get(f"/v1/certificates/{sha}").content == envelope
    statement = json.loads(base64.b64decode(json.loads(envelope)["payload"]))
    return {
        "job": job,
        "envelope": envelope,
        "sha256": sha,
        "statement": statement,
        "digests": input_digests(x[:INPUTS].numpy()),
    }


def record_requests(page: Page) -> tuple[list[str], dict[str, int]]:
    """The URLs ``page`` requests, and the status of each answer, as they happen."""
    urls: list[str] = []
    statuses: dict[str, int] = {}
    page.on("request", lambda r: urls.append(r.url))
    page.on("response", lambda r: statuses.__setitem__(r.url, r.status))
    return urls, statuses


def expect_the_report(page: Page, certified: dict, demo_model: dict) -> None:
    """``page`` shows ``certified``'s report: its digests, rows and curve."""
    statement = certified["statement"]
    expect(page.get_by_test_id("certificate-sha256")).to_have_text(certified["sha256"])
    expect(page.get_by_test_id("model-sha256")).to_have_text(demo_model["sha256"])
    expect(page.get_by_test_id("model-id")).to_have_text(demo_model["id"])
    expect(page.get_by_test_id("account")).to_have_text("default")
    rows = page.get_by_test_id("rows").locator("tbody tr")
    expect(rows).to_have_count(INPUTS)
    digests = page.get_by_test_id("rows").locator("code[data-sha256]")
    assert [d.get_attribute("title") for d in digests.all()] == certified["digests"]
    for tr, row in zip(rows.all(), statement["predicate"]["rows"], strict=True):
        cells = tr.locator("td")
        expect(cells.nth(0)).to_have_text(str(row["index"]))
        expect(cells.nth(2)).to_have_text(str(row["label"]))
        expect(cells.nth(3)).to_have_text(
            "abstained" if row["abstained"] else str(row["prediction"])
        )
        expect(cells.nth(4)).to_have_text(f"{row['radius']:.4f}")
        expect(cells.nth(5)).to_have_text(f"{row['p_a_lower']:.4f}")
    expect(page.get_by_test_id("promise")).to_contain_text("smoothed classifier")
    expect(page.get_by_test_id("curve").locator("svg path.curve")).to_have_count(1)
    expect(page.get_by_test_id("verify-commands")).to_contain_text(
        f"$URL/v1/certificates/{certified['sha256']} > cert.json"
    )
    # styled by the stylesheet from this origin (the page has no inline style)
    expect(page.locator("main.report")).to_have_css("max-width", re.compile(r"^\d+(\.\d+)?px$"))


def test_the_report_shows_the_certificates_digests_and_rows_and_asks_nothing_elsewhere(
    tab, api_url, certified, demo_model
):
    page = tab.page
    urls, statuses = record_requests(page)
    page.set_extra_http_headers({"Authorization": f"Bearer {USER_KEY}"})
    resp = page.goto(f"{api_url}/v1/jobs/{certified['job']['id']}/report.html")
    assert resp is not None and resp.status == 200, resp and resp.text()
    assert resp.headers["content-type"].startswith("text/html")
    expect_the_report(page, certified, demo_model)
    assert statuses.get(f"{api_url}/ui/report.css") == 200
    assert urls and {origin(u) for u in urls} == {origin(api_url)}, urls


def test_the_pages_links_save_the_certificate_and_open_the_report(
    browser, tab, api_url, certified, demo_model
):
    job_id = certified["job"]["id"]
    page = tab.page
    urls: list[str] = []

    def note(request) -> None:  # every tab of the browser, the new one too
        urls.append(request.url)

    browser.on("request", note)
    try:
        page.goto(f"{api_url}/#job={job_id}")
        page.get_by_test_id("api-key").fill(USER_KEY)
        page.get_by_test_id("save-key").click()
        expect(page.get_by_test_id("job-status")).to_have_attribute("data-status", "succeeded")
        expect(page.get_by_test_id("certificate-links")).to_be_visible()
        link, report = (
            page.get_by_test_id("certificate-json"),
            page.get_by_test_id("certificate-report"),
        )
        expect(link).to_have_text("certificate (JSON)")
        expect(link).to_have_attribute("href", f"/v1/jobs/{job_id}/certificate")
        expect(report).to_have_text("report")
        expect(report).to_have_attribute("href", f"/v1/jobs/{job_id}/report.html")

        with page.expect_download() as download:
            link.click()
        assert download.value.suggested_filename == f"certificate-{job_id}.json"
        with open(download.value.path(), "rb") as f:
            assert f.read() == certified["envelope"]  # the signed bytes, as they are

        with browser.expect_page() as opened:
            report.click()
        shown = opened.value
        errors: list[str] = []
        shown.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        shown.wait_for_url(re.compile("^blob:"))
        expect_the_report(shown, certified, demo_model)
        expect(page.get_by_test_id("certificate-error")).to_be_hidden()
        shown.close()
        assert not errors, errors
    finally:
        browser.remove_listener("request", note)
    elsewhere = [u for u in urls if u != "about:blank" and origin(u) != origin(api_url)]
    assert not elsewhere, elsewhere
