"""Take the screenshots of the web page (README.md, docs/), against a running ``smoothcert up``.

    PYTHONPATH=<a view of the package> python tools/screenshots.py URL API_KEY [ADMIN_KEY [OUT_DIR]]

Needs Debian's chromium (``make test`` installs it) and the ``test`` extra (Playwright). It
certifies demo digit 3 through the page, certifies the first 100 held-out digits as two dataset
jobs through the API (σ = 0.25 and σ = 0.5), opens the first from the page's jobs table and its
printable report (``GET /v1/jobs/{id}/report.html``, with the key in the Authorization header),
compares the two from the jobs table's Compare column, and, given the admin key (a key with the
``train`` scope; both keys are in DATA_DIR/credentials.env), trains a 2-epoch classifier on the
built-in "digits" from the page's training form; its training job needs the stack's worker. It
writes small palette PNGs to OUT_DIR (docs/screenshots): certify.png (form and answer),
dataset.png (a dataset job: its rows, one row's answer, its curve and the summary below it),
jobs.png (the recent jobs), compare.png (the two jobs ticked in the jobs table, their curves
overlaid and their figures side by side), training.png (the finished training job: its
settings, epochs, loss and accuracy chart, metrics and trained model; the model is deleted
afterwards) and report.png (the σ = 0.25 job's report). Without ADMIN_KEY training.png is
skipped. The report of 100 rows is some 6,000 pixels tall and its summary comes after the rows, so
report.png is two crops of one full-page screenshot, the top (title, certificate, guarantee) and
the summary (accuracy, ACR, the certified-accuracy table and curve), joined by a band naming what
is left out; a page that fits REPORT_VIEWPORT is kept whole. The jobs, radii and training figures
shown are whatever that stack computes; nothing here is a test.
"""

from __future__ import annotations

import io
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from playwright.sync_api import expect, sync_playwright

from smoothcert.models.demo import load_digits_split

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
OUT = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
DONE = re.compile("succeeded|failed|canceled")
REPORT_VIEWPORT = {"width": 1200, "height": 1600}  # report.png: a page this size is kept whole
REPORT_PARTS = ("main.report", "#model", "#summary")  # column, end of the top, summary
REPORT_GAP = "⋯  model, dataset, parameters, who asked, what ran it, the 100 rows  ⋯"


TRAIN_EPOCHS = 2
TRAIN_TIMEOUT_MS = 600_000


def dataset_jobs(url: str, key: str, model_id: str, sigmas: tuple[float, ...]) -> list[str]:
    """Finished certify jobs over the first 100 held-out digits, one per σ, made through the API."""
    _, _, test_x, test_y = load_digits_split()
    buf = io.BytesIO()
    np.savez(buf, x=test_x[:100], y=test_y[:100])
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as api:
        up = api.post("/v1/datasets", files={"file": ("digits_test_100.npz", buf.getvalue())})
        up.raise_for_status()
        dataset_id, job_ids = up.json()["id"], []
        for sigma in sigmas:
            job = api.post(
                "/v1/certify",
                json={"model_id": model_id, "dataset_id": dataset_id, "sigma": sigma, "n": 2000},
            )
            job.raise_for_status()
            job_ids.append(job.json()["job_id"])
        for job_id in job_ids:
            while (status := api.get(f"/v1/jobs/{job_id}").json()["status"]) not in (
                "succeeded",
                "failed",
                "canceled",
            ):
                time.sleep(0.5)
            if status != "succeeded":
                raise SystemExit(f"dataset job {job_id}: {status}")
    return job_ids


def check_admin(url: str, admin_key: str) -> None:
    """Stop early, before any job, unless ``admin_key`` is a key with the train scope."""
    me = httpx.get(url + "/v1/whoami", headers={"Authorization": f"Bearer {admin_key}"})
    if me.status_code != 200 or "train" not in me.json().get("scopes", []):
        raise SystemExit(f"ADMIN_KEY: not a key with the train scope ({me.status_code} {me.text})")


def sign_in(page, url: str, key: str) -> None:
    page.goto(url + "/")
    page.get_by_test_id("api-key").fill(key)
    page.get_by_test_id("save-key").click()
    expect(page.get_by_test_id("key-account")).to_be_visible()


def training_shot(context, url: str, admin_key: str, out: Path) -> None:
    """training.png: a 2-epoch classifier on "digits" submitted from the page's training form with
    the admin key, its job view once it succeeded; the trained model is deleted afterwards."""
    page = context.new_page()
    sign_in(page, url, admin_key)
    expect(page.get_by_test_id("train-locked")).to_be_hidden()
    page.get_by_test_id("train-what").select_option("classifier")
    page.get_by_test_id("train-dataset").fill("digits")
    page.get_by_test_id("train-name").fill("digits-noise-0.25")
    page.get_by_test_id("train-epochs").fill(str(TRAIN_EPOCHS))
    page.get_by_test_id("train-sigma").fill("0.25")
    page.get_by_test_id("train-seed").fill("0")
    page.get_by_test_id("train-submit").click()
    status = page.get_by_test_id("job-status")
    expect(status).to_have_attribute("data-status", DONE, timeout=TRAIN_TIMEOUT_MS)
    job_id = page.get_by_test_id("job-id").inner_text()
    if status.get_attribute("data-status") != "succeeded":
        raise SystemExit(f"training job {job_id}: {status.inner_text()}")
    expect(page.get_by_test_id("train-chart").locator("svg")).to_have_count(2)
    expect(page.get_by_test_id("trained-model-id")).to_be_visible()
    model_id = page.get_by_test_id("trained-model-id").inner_text()
    try:
        page.mouse.move(0, 0)
        save_small(page.locator("#job").screenshot(), out / "training.png", width=640)
    finally:
        httpx.delete(
            f"{url}/v1/models/{model_id}", headers={"Authorization": f"Bearer {admin_key}"}
        ).raise_for_status()
    page.close()


def save_small(png: bytes, path: Path, width: int = 1000) -> None:
    """``png`` scaled to ``width`` pixels wide and reduced to a 128-colour palette."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size} bytes")


def report_excerpt(png: bytes, column: dict, model: dict, summary: dict) -> bytes:
    """The report's top (down to its Model section) over its Summary section, both cropped to the
    page's column from the full-page screenshot ``png``, with a band between naming what is cut."""
    page = Image.open(io.BytesIO(png)).convert("RGB")
    left, right = round(column["x"]), round(column["x"] + column["width"])
    top = page.crop((left, 0, right, round(model["y"]) - 8))
    bottom = page.crop(
        (left, round(summary["y"]) - 4, right, round(summary["y"] + summary["height"]) + 20)
    )
    band = Image.new("RGB", (right - left, 40), (245, 246, 249))  # report.css's --paper
    draw = ImageDraw.Draw(band)
    draw.text(
        (band.width / 2, band.height / 2),
        REPORT_GAP,
        fill=(93, 101, 119),  # --muted
        font=ImageFont.truetype("DejaVuSans.ttf", 14),
        anchor="mm",
    )
    joined = Image.new("RGB", (right - left, top.height + band.height + bottom.height), "white")
    for image, y in ((top, 0), (band, top.height), (bottom, top.height + band.height)):
        joined.paste(image, (0, y))
    buf = io.BytesIO()
    joined.save(buf, format="PNG")
    return buf.getvalue()


def main(url: str, key: str, admin_key: str | None, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if admin_key:
        check_admin(url, admin_key)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as api:
        model_id = api.get("/v1/models").json()[0]["id"]
    dataset_job_id, wide_job_id = dataset_jobs(url, key, model_id, (0.25, 0.5))
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path="/usr/bin/chromium",
            args=FLAGS,
            headless=True,
            viewport={"width": 1280, "height": 1600},
            device_scale_factor=1,
        )
        context.set_default_timeout(120_000)
        page = context.new_page()
        sign_in(page, url, key)
        page.get_by_test_id("model-select").select_option(model_id)
        page.get_by_test_id("demo-digit-3").click()
        page.get_by_test_id("n").fill("10000")
        page.get_by_test_id("submit").click()
        expect(page.get_by_test_id("job-status")).to_have_attribute(
            "data-status", DONE, timeout=120_000
        )
        expect(page.get_by_test_id("noisy-samples").locator("img")).to_be_visible()
        page.mouse.move(0, 0)
        page.locator(
            "header"
        ).scroll_into_view_if_needed()  # the viewport holds it all: page coordinates
        box = page.locator("main").bounding_box()
        figures = page.locator("#job .figures").bounding_box()
        clip = {
            "x": box["x"],
            "y": 0,
            "width": box["width"],
            "height": figures["y"] + figures["height"] + 24,
        }
        save_small(page.screenshot(clip=clip, full_page=True), out / "certify.png")

        page.get_by_test_id("jobs-refresh").click()
        table = page.get_by_test_id("jobs-table")
        row = table.locator(f'tr[data-job-id="{dataset_job_id}"]')
        expect(row).to_be_visible()
        expect(table.locator(f'tr[data-job-id="{wide_job_id}"]')).to_be_visible()
        save_small(page.locator("#jobs").screenshot(), out / "jobs.png")
        row.get_by_test_id("open-job").click()
        expect(page.get_by_test_id("curve").locator("img")).to_be_visible()
        expect(page.get_by_test_id("summary-table").locator("tbody tr").first).to_be_visible()
        page.mouse.move(0, 0)
        # The whole card, the summary table below the curve included (an element screenshot
        # captures the element beyond the viewport).
        save_small(page.locator("#job").screenshot(), out / "dataset.png", width=640)

        # compare.png: both jobs ticked in the jobs table, then the compare view below it.
        for job_id in (dataset_job_id, wide_job_id):
            table.locator(f'tr[data-job-id="{job_id}"]').get_by_test_id("compare-pick").check()
        button = page.get_by_test_id("compare-button")
        expect(button).to_have_text("Compare the 2 picked jobs")
        button.click()
        chart = page.get_by_test_id("compare-chart")
        expect(chart.locator("svg g.series")).to_have_count(2)
        expect(page.get_by_test_id("compare-table").locator("tbody tr")).to_have_count(2)
        page.mouse.move(0, 0)
        page.evaluate("window.scrollTo(0, 0)")
        jobs_box = page.locator("#jobs").bounding_box()
        compare_box = page.locator("#compare").bounding_box()
        clip = {
            "x": jobs_box["x"] - 8,
            "y": jobs_box["y"] - 8,
            "width": jobs_box["width"] + 16,
            "height": compare_box["y"] + compare_box["height"] - jobs_box["y"] + 16,
        }
        save_small(page.screenshot(clip=clip, full_page=True), out / "compare.png")

        report = context.new_page()
        report.set_viewport_size(REPORT_VIEWPORT)
        report.set_extra_http_headers({"Authorization": f"Bearer {key}"})
        response = report.goto(f"{url}/v1/jobs/{dataset_job_id}/report.html")
        if response is None or not response.ok:
            raise SystemExit(f"report.html: {response.status if response else 'no response'}")
        report.wait_for_load_state("networkidle")
        expect(report.get_by_test_id("curve").locator("svg")).to_be_visible()
        png = report.screenshot(full_page=True)
        if report.evaluate("document.documentElement.scrollHeight") > REPORT_VIEWPORT["height"]:
            png = report_excerpt(png, *(report.locator(s).bounding_box() for s in REPORT_PARTS))
        save_small(png, out / "report.png")

        if admin_key:
            training_shot(context, url, admin_key, out)
        else:
            print("training.png: skipped (no ADMIN_KEY)")
        context.close()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(
        sys.argv[1],
        sys.argv[2],
        sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None,
        Path(sys.argv[4]) if len(sys.argv) > 4 else OUT,
    )
