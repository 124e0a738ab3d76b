"""The compare view in a real browser against the real stack: two dataset jobs of the same images
at σ = 0.25 and 0.5, picked in the jobs table, drawn as two curves in one chart with a legend
naming both σ, and a table whose figures equal what their rows over HTTP give."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import open_page
from tests.browser.test_dataset_view import dataset_job, right
from tests.support.stack import USER_KEY


def certified_at(rows: list[dict], r: float) -> float:
    return sum(right(row) and row["radius"] >= r for row in rows) / len(rows)


def test_two_jobs_overlaid_with_a_legend_by_model_and_sigma(
    tab, api_url, client, demo_model, digits_test_set
):
    jobs = [
        dataset_job(client, demo_model["id"], digits_test_set, 10, sigma=sigma, n=400)
        for sigma in (0.25, 0.5)
    ]
    page = open_page(tab, api_url, USER_KEY)
    button = page.get_by_test_id("compare-button")
    expect(button).to_be_disabled()
    table = page.get_by_test_id("jobs-table")
    for job in jobs:
        table.locator(f'tr[data-job-id="{job["id"]}"]').get_by_test_id("compare-pick").check()
    expect(button).to_have_text("Compare the 2 picked jobs")
    button.click()

    chart = page.get_by_test_id("compare-chart")
    expect(chart.locator("svg g.series")).to_have_count(2)
    expect(chart.locator("svg g.series polyline")).to_have_count(2)
    legend = page.get_by_test_id("compare-legend").locator("li")
    name = demo_model["name"]
    expect(legend).to_have_text([f"{name}, σ = 0.25", f"{name}, σ = 0.5"])
    assert [s.get_attribute("data-series") for s in chart.locator("svg g.series").all()] == [
        f"{name}, σ = 0.25",
        f"{name}, σ = 0.5",
    ]

    lines = page.get_by_test_id("compare-table").locator("tbody tr")
    expect(lines).to_have_count(2)
    for line, job in zip(lines.all(), jobs):
        rows = job["result"]["results"]
        assert line.get_attribute("data-job-id") == job["id"]

        def value(col: str) -> float:
            return float(line.locator(f'td[data-col="{col}"]').get_attribute("data-value"))

        assert value("sigma") == job["params"]["sigma"]
        assert value("n") == 400
        assert value("inputs") == len(rows)
        assert value("accuracy") == pytest.approx(certified_at(rows, 0.0))
        acr = sum(r["radius"] if right(r) else 0.0 for r in rows) / len(rows)
        assert value("acr") == pytest.approx(acr)
        for r in (0.25, 0.5, 1.0):
            assert value(f"at-{r:g}") == pytest.approx(certified_at(rows, r))
    # σ = 0.5 reaches farther: its curve's radius cap is twice the other's, so the curves differ.
    caps = [max(r["radius_cap"] for r in job["result"]["results"]) for job in jobs]
    assert caps[1] == pytest.approx(2 * caps[0])
