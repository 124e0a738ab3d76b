"""A dataset job's view on the page, in a real browser against the real stack: the table at the
standard radii, clean accuracy, abstentions, ACR and the 95% interval, each equal to what the
job's rows over HTTP give; the TSV and JSON downloads, byte for byte; a target-radius run's samples
used, stop reasons and inputs settled; the words of the guarantee; the note on a model's first job.
"""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import open_page
from tests.support.stack import USER_KEY, upload_dataset, wait_job

Z95 = 1.959963984540054


def wilson(k: int, n: int) -> tuple[float, float]:
    p, z2 = k / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def right(row: dict) -> bool:
    return (
        not row["abstained"] and row["prediction"] is not None and row["prediction"] == row["label"]
    )


def dataset_job(client, model_id: str, digits_test_set, count: int, **params) -> dict:
    """A succeeded certify job over the first ``count`` held-out digits, with their labels."""
    x, y = digits_test_set
    buf = io.BytesIO()
    np.savez(buf, x=x[:count].numpy(), y=y[:count])
    uploaded = upload_dataset(client, buf.getvalue())
    assert uploaded.status_code == 201, uploaded.text
    body = {"model_id": model_id, "dataset_id": uploaded.json()["id"], "seed": 1, **params}
    submitted = client.post("/v1/certify", json=body)
    assert submitted.status_code == 202, submitted.text
    job = wait_job(client, submitted.json()["job_id"], timeout=120)
    assert job["status"] == "succeeded", job
    return job


def open_job(tab, api_url, job_id: str):
    page = open_page(tab, api_url, USER_KEY)
    page.get_by_test_id("jobs-table").locator(f'tr[data-job-id="{job_id}"]').get_by_test_id(
        "open-job"
    ).click()
    expect(page.get_by_test_id("job-id")).to_have_text(job_id)
    expect(page.get_by_test_id("job-status")).to_have_attribute("data-status", "succeeded")
    return page


def test_the_dataset_view_shows_the_numbers_of_its_rows_and_downloads_them(
    tab, api_url, client, demo_model, digits_test_set
):
    job = dataset_job(client, demo_model["id"], digits_test_set, 12, sigma=0.25, n=400, n0=50)
    rows = job["result"]["results"]
    n = len(rows)
    page = open_job(tab, api_url, job["id"])
    expect(page.get_by_test_id("summary-block")).to_be_visible()

    # The table: one line per standard radius, 0 to the rows' radius cap.
    cap = max(r["radius_cap"] for r in rows)
    radii = [0.25 * i for i in range(int(cap / 0.25 + 1e-9) + 1)]
    lines = page.get_by_test_id("summary-table").locator("tbody tr")
    expect(lines).to_have_count(len(radii))
    for line, r in zip(lines.all(), radii):
        k = sum(right(row) and row["radius"] >= r for row in rows)
        assert float(line.get_attribute("data-radius")) == pytest.approx(r)
        assert int(line.get_attribute("data-count")) == k
        assert float(line.get_attribute("data-accuracy")) == pytest.approx(k / n)
        low, high = wilson(k, n)
        cells = line.locator("td")
        expect(cells.nth(1)).to_have_text(f"{100 * k / n:.1f}%")
        expect(cells.nth(2)).to_have_text(f"{100 * low:.1f}% – {100 * high:.1f}%")
        expect(cells.nth(2)).to_have_attribute(
            "title", re.compile(f"Wilson.*an estimate from {n} images")
        )

    facts = page.get_by_test_id("summary-facts")
    clean = sum(right(row) for row in rows)
    abstained = sum(row["abstained"] for row in rows)
    acr = sum(row["radius"] if right(row) else 0.0 for row in rows) / n
    if isinstance(job["result"].get("acr"), float):  # the API's own ACR, where it reports one
        assert job["result"]["acr"] == pytest.approx(acr)
    expect(facts.locator('[data-fact="inputs"]')).to_have_text(str(n))
    assert float(
        facts.locator('[data-fact="clean-accuracy"]').get_attribute("data-value")
    ) == pytest.approx(clean / n)
    expect(facts.locator('[data-fact="clean-accuracy"]')).to_contain_text(f"({clean} of {n}; 95%")
    expect(facts.locator('[data-fact="abstentions"]')).to_have_text(
        f"{abstained} ({100 * abstained / n:.1f}%)"
    )
    assert float(facts.locator('[data-fact="ACR"]').get_attribute("data-value")) == pytest.approx(
        acr
    )
    expect(facts.locator('[data-fact="ACR"]')).to_contain_text(f"{acr:.3f}")
    expect(page.get_by_test_id("summary-note")).to_contain_text(f"an estimate from {n} images")

    # The downloads: the API's exact bytes, fetched with the key.
    for link, path, name in (
        ("download-tsv", f"/v1/jobs/{job['id']}/results.tsv", f"results-{job['id']}.tsv"),
        ("download-json", f"/v1/jobs/{job['id']}", f"job-{job['id']}.json"),
    ):
        with page.expect_download() as download:
            page.get_by_test_id(link).click()
        assert download.value.suggested_filename == name
        with open(download.value.path(), "rb") as f:
            saved = f.read()
        served = client.get(path)
        assert served.status_code == 200
        assert saved == served.content
    assert json.loads(saved)["result"]["results"] == rows
    expect(page.get_by_test_id("download-error")).to_be_hidden()

    # The words: a class that matches its label says so; α is per input and about g.
    matched = next((i for i, row in enumerate(rows) if right(row)), None)
    assert matched is not None, "no row certified its label: the model should get some right"
    page.get_by_test_id("rows-table").locator("tbody tr").nth(matched).click()
    expect(page.get_by_test_id("result-class")).to_contain_text("(matches the label)")
    hint = page.get_by_test_id("alpha-hint")
    expect(hint).to_contain_text("α·N")
    expect(hint).to_contain_text("smoothed classifier g")
    expect(hint).not_to_contain_text("Chance that the answer is wrong")


def test_a_target_radius_job_shows_samples_used_and_why_each_input_stopped(
    tab, api_url, client, demo_model, digits_test_set
):
    job = dataset_job(
        client,
        demo_model["id"],
        digits_test_set,
        6,
        sigma=0.25,
        n=20000,
        n0=100,
        target_radius=0.25,
    )
    rows = job["result"]["results"]
    used = sum(r["samples_used"] for r in rows)
    budget = len(rows) * (100 + 20000)
    assert used < budget  # the test stopped early for some input, or the check shows nothing
    assert job["progress"] == {"done": len(rows), "total": len(rows), "unit": "inputs"}
    page = open_job(tab, api_url, job["id"])

    progress = page.get_by_test_id("progress-text")
    expect(progress).to_contain_text(f"{len(rows)} of {len(rows)} inputs settled at r = 0.25")
    expect(progress).to_contain_text(f"with {used:,} noisy samples")
    expect(progress).not_to_contain_text(f"{budget:,} of {budget:,}")
    expect(page.get_by_test_id("summary-facts").locator('[data-fact="samples-used"]')).to_have_text(
        f"{used:,}"
    )
    table = page.get_by_test_id("rows-table")
    expect(table.locator("thead th")).to_contain_text(["samples used", "stopped because"])
    for i, row in enumerate(rows[:3]):
        table.locator("tbody tr").nth(i).click()
        expect(page.get_by_test_id("result-samples")).to_have_attribute(
            "data-value", str(row["samples_used"])
        )
        expect(page.get_by_test_id("result-stop")).to_have_text(row["reason"])
        expect(table.locator("tbody tr").nth(i).locator("td").nth(6)).to_have_text(row["reason"])


def test_a_running_target_radius_job_counts_inputs_settled(
    tab, api_url, client, demo_model, digits_test_set
):
    job = dataset_job(
        client, demo_model["id"], digits_test_set, 3, sigma=0.25, n=2000, target_radius=0.25
    )
    # The record as it was while running, two inputs of three settled: shown that, then the real one.
    running = {
        **job,
        "status": "running",
        "progress": {"done": 2, "total": 3, "unit": "inputs"},
        "result": None,
    }
    answers = [running]
    tab.page.route(
        f"**/v1/jobs/{job['id']}",
        lambda route: route.fulfill(json=answers[0]) if answers else route.continue_(),
    )
    page = open_page(tab, api_url, USER_KEY)
    page.get_by_test_id("jobs-table").locator(f'tr[data-job-id="{job["id"]}"]').get_by_test_id(
        "open-job"
    ).click()
    progress = page.get_by_test_id("progress-text")
    expect(progress).to_have_text(
        "2 of 3 inputs settled at r = 0.25 (67%); each leaves as soon as its test decides"
    )
    answers.clear()
    expect(page.get_by_test_id("job-status")).to_have_attribute("data-status", "succeeded")
    expect(progress).to_contain_text("3 of 3 inputs settled at r = 0.25, with ")


def test_a_job_waiting_at_zero_says_why_the_first_job_of_a_model_waits(
    tab, api_url, client, demo_model, digits_test_set
):
    job = dataset_job(client, demo_model["id"], digits_test_set, 2, sigma=0.25, n=200)
    # The record as it was while queued: the page is shown that, then the real one.
    queued = {
        **job,
        "status": "queued",
        "progress": {"done": 0, "total": 2 * 300, "unit": "samples"},
        "result": None,
    }
    answers = [queued]

    def record(route):
        if answers:
            route.fulfill(json=answers[0])
        else:
            route.continue_()

    tab.page.route(f"**/v1/jobs/{job['id']}", record)
    page = open_page(tab, api_url, USER_KEY)
    page.get_by_test_id("jobs-table").locator(f'tr[data-job-id="{job["id"]}"]').get_by_test_id(
        "open-job"
    ).click()
    note = page.get_by_test_id("runtime-note")
    expect(note).to_be_visible()
    expect(note).to_contain_text("first job of a model")
    answers.clear()
    expect(page.get_by_test_id("job-status")).to_have_attribute("data-status", "succeeded")
    expect(note).to_be_hidden()
