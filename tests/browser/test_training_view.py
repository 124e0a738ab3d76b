"""Training from the page, in a real browser against the real stack and a trainer: the form is
offered to keys with the train scope only; a 1-epoch job on "digits" submitted from it shows its
own parameters, progress in epochs, the history as a chart with one point per epoch, its metrics,
and the trained model, which the page then picks in the certify form."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from smoothcert.service.core.queue import TRAIN_QUEUE
from tests.browser.conftest import open_page
from tests.support.stack import ADMIN_KEY, USER_KEY, stack_env, start_worker, stop_process


@pytest.fixture(scope="module")
def trainer(redis_url, data_dir) -> Iterator[subprocess.Popen]:
    """A worker that consumes only the ``train`` queue (the session's worker does not)."""
    log = data_dir / "page-trainer.log"
    proc, _ = start_worker(
        stack_env(redis_url, data_dir), log, "page-trainer@tests", "--queues", TRAIN_QUEUE
    )
    yield proc
    stop_process(proc)


def test_a_key_without_the_train_scope_gets_no_training_form(tab, api_url):
    page = open_page(tab, api_url, USER_KEY)  # certify only
    expect(page.get_by_test_id("train-locked")).to_contain_text(
        "Training needs a key with the train scope"
    )
    expect(page.get_by_test_id("train-submit")).to_be_hidden()
    expect(page.get_by_test_id("train-submit")).to_be_disabled()


def test_train_one_epoch_from_the_page_and_use_the_model(tab, api_url, admin, trainer):
    name = f"page-trained-{uuid.uuid4().hex[:6]}"
    page = open_page(tab, api_url, ADMIN_KEY)
    expect(page.get_by_test_id("train-locked")).to_be_hidden()
    page.get_by_test_id("train-what").select_option("classifier")
    page.get_by_test_id("train-dataset").fill("digits")
    page.get_by_test_id("train-name").fill(name)
    page.get_by_test_id("train-epochs").fill("1")
    page.get_by_test_id("train-sigma").fill("0.25")
    page.get_by_test_id("train-seed").fill("3")
    page.get_by_test_id("train-submit").click()

    expect(page.get_by_test_id("job-status")).to_have_attribute("data-status", "succeeded")
    job_id = page.get_by_test_id("job-id").inner_text()
    job = admin.get(f"/v1/jobs/{job_id}").json()
    assert job["kind"] == "train" and job["status"] == "succeeded"
    assert (job["params"]["epochs"], job["params"]["dataset"], job["params"]["name"]) == (
        1,
        "digits",
        name,
    )
    result = job["result"]
    model_id = result["model_id"]
    try:
        expect(page.get_by_test_id("progress-text")).to_have_text("1 of 1 epochs (100%)")
        params = page.get_by_test_id("job-params")
        expect(params).to_contain_text("digits_cnn")
        expect(params).to_contain_text("σ = 0.25, 1 epoch, batch 128")
        expect(params).not_to_contain_text("undefined")
        expect(params).not_to_contain_text("n0")

        # The history: one point per epoch in the loss chart, at the recorded loss.
        chart = page.get_by_test_id("train-chart")
        loss = chart.locator('g.series[data-series="loss"] circle.point')
        expect(loss).to_have_count(len(result["history"]))
        assert len(result["history"]) == job["params"]["epochs"] == 1
        assert float(loss.first.get_attribute("data-y")) == pytest.approx(
            result["history"][0]["loss"]
        )
        expect(chart.locator("svg")).to_have_count(2)  # loss, and accuracy under noise
        metrics = page.get_by_test_id("train-metrics")
        expect(metrics.locator('[data-metric="test_clean_accuracy"]')).to_have_text(
            f"{100 * result['metrics']['test_clean_accuracy']:.1f}%"
        )

        # The trained model: named in the view and in the jobs table, and picked on request.
        expect(page.get_by_test_id("trained-model-id")).to_have_text(model_id)
        row = page.get_by_test_id("jobs-table").locator(f'tr[data-job-id="{job_id}"]')
        expect(row.get_by_test_id("job-model")).to_have_text(result["model_name"])
        page.get_by_test_id("use-trained-model").click()
        expect(page.get_by_test_id("model-select")).to_have_value(model_id)
        expect(page.get_by_test_id("model-info")).to_contain_text(re.compile(r"training σ\s*0.25"))
    finally:
        assert admin.delete(f"/v1/models/{model_id}").status_code == 204


def test_train_a_stability_denoiser_in_two_stages_from_the_page(
    tab, api_url, admin, trainer, demo_model
):
    page = open_page(tab, api_url, ADMIN_KEY)
    page.get_by_test_id("train-what").select_option("denoiser")
    expect(page.get_by_test_id("train-arch")).to_be_hidden()  # a classifier's field
    page.get_by_test_id("train-objective").select_option("stability")
    page.get_by_test_id("train-classifier").select_option(demo_model["id"])
    page.get_by_test_id("train-dataset").fill("digits")
    page.get_by_test_id("train-sigma").fill("0.5")
    page.get_by_test_id("train-epochs").fill("1")
    page.get_by_test_id("train-mse-epochs").fill("1")
    page.get_by_test_id("train-depth").fill("3")
    page.get_by_test_id("train-width").fill("8")
    page.get_by_test_id("train-seed").fill("5")
    page.get_by_test_id("train-submit").click()

    expect(page.get_by_test_id("job-status")).to_have_attribute("data-status", "succeeded")
    job_id = page.get_by_test_id("job-id").inner_text()
    job = admin.get(f"/v1/jobs/{job_id}").json()
    assert job["kind"] == "train_denoiser" and job["status"] == "succeeded"
    p = job["params"]
    assert (p["objective"], p["classifier"], p["epochs"], p["mse_epochs"]) == (
        "stability",
        demo_model["id"],
        1,
        1,
    )
    # The service's stability defaults, since the form left batch size and lr empty.
    assert (p["batch_size"], p["lr"], p["depth"], p["width"]) == (32, 3e-4, 3, 8)
    result = job["result"]
    model_id = result["model_id"]
    try:
        # Both stages count: 2 epochs, one point each on a chart that spans both.
        expect(page.get_by_test_id("progress-text")).to_have_text("2 of 2 epochs (100%)")
        params = page.get_by_test_id("job-params")
        expect(params).to_contain_text("objective")
        expect(params).to_contain_text("MSE for 1 epoch, then stability from its weights")
        expect(params).to_contain_text("σ = 0.5, 1 epoch, batch 32, lr 0.0003")
        expect(params).not_to_contain_text("undefined")
        loss = page.get_by_test_id("train-chart").locator(
            'g.series[data-series="loss"] circle.point'
        )
        expect(loss).to_have_count(2)
        assert [h["stage"] for h in result["history"]] == ["mse", "stability"]
        assert [float(loss.nth(i).get_attribute("data-x")) for i in range(2)] == [1.0, 2.0]
        expect(page.get_by_test_id("trained-model-id")).to_have_text(model_id)
        model = admin.get(f"/v1/models/{model_id}").json()
        assert model["kind"] == "denoiser"
    finally:
        assert admin.delete(f"/v1/models/{model_id}").status_code == 204
