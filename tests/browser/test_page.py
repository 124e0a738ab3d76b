"""The web page at ``/`` in a real browser against the real stack (Redis, a worker, the API).

What a person does on the page, checked against what the API says over HTTP for the same job:
certify an uploaded PNG, cancel a long job, read the recent jobs and a dataset job's curve, open ``/docs`` with no
internet, upload a model with the admin key; the key's account and scopes (``GET /v1/whoami``)
and the sections they allow, with keys made through ``POST /v1/keys``. Every tab is offline
(conftest.py).
"""

from __future__ import annotations

import io
import re
import uuid

import numpy as np
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import open_page
from tests.support.images import grey8
from tests.support.stack import ADMIN_KEY, USER_KEY, upload_dataset, upload_model, wait_job

REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def make_key(admin, *scopes: str) -> dict:
    """A new key (``POST /v1/keys``, the admin's) of a new account with ``scopes``."""
    made = admin.post(
        "/v1/keys", json={"account": f"page-{uuid.uuid4().hex[:8]}", "scopes": list(scopes)}
    )
    assert made.status_code == 201, made.text
    return made.json()


def test_certify_an_uploaded_png_shows_the_radius_the_api_returns(
    tab, api_url, client, demo_model, digits_test_set, tmp_path
):
    x, y = digits_test_set
    png = tmp_path / "digit.png"
    png.write_bytes(grey8(x[0, 0].numpy()))
    page = open_page(tab, api_url, USER_KEY)
    page.get_by_test_id("model-select").select_option(demo_model["id"])
    expect(page.get_by_test_id("sigma")).to_have_value(
        str(demo_model["sigma"])
    )  # the model's training σ
    page.get_by_test_id("image-input").set_input_files(str(png))
    page.get_by_test_id("labels").fill(str(int(y[0])))
    page.get_by_test_id("n").fill("2000")
    page.get_by_test_id("submit").click()

    expect(page.get_by_test_id("job-status")).to_have_attribute("data-status", "succeeded")
    expect(page.get_by_test_id("result")).to_be_visible()
    job = client.get(f"/v1/jobs/{page.get_by_test_id('job-id').inner_text()}").json()
    assert (job["params"]["sigma"], job["params"]["n"], job["params"]["mode"]) == (
        demo_model["sigma"],
        2000,
        "certify",
    )
    [row] = job["result"]["results"]
    radius = page.get_by_test_id("result-radius")
    expect(radius).to_have_text(f"{row['radius']:.4f}")
    assert float(radius.get_attribute("data-value")) == row["radius"]
    expect(page.get_by_test_id("result-cap")).to_have_text(f"{row['radius_cap']:.4f}")
    expect(page.get_by_test_id("result-class")).to_have_attribute(
        "data-value", "" if row["prediction"] is None else str(row["prediction"])
    )
    expect(page.get_by_test_id("result-abstained")).to_have_attribute(
        "data-value", str(row["abstained"]).lower()
    )
    expect(page.get_by_test_id("result-pa")).to_have_text(f"{row['p_a_lower']:.4f}")

    bars = page.get_by_test_id("vote-histogram").locator(".bar-row")
    expect(bars).to_have_count(
        demo_model["num_classes"]
    )  # every class of a 10-class model, zeros too
    shown = {
        int(b.get_attribute("data-class")): int(b.get_attribute("data-count")) for b in bars.all()
    }
    assert shown == {c: row["votes"].get(str(c), 0) for c in range(demo_model["num_classes"])}
    assert sum(shown.values()) == row["n"] == 2000
    for figure in ("noisy-samples", "curve"):  # fetched with the key, shown from a blob: URL
        expect(page.get_by_test_id(figure).locator("img")).to_have_attribute(
            "src", re.compile("^blob:")
        )


def test_discrete_noise_from_the_page_and_a_float_npy_rounded_onto_the_grid(
    tab, api_url, client, demo_model, digits_test_set, tmp_path
):
    x, _ = digits_test_set
    page = open_page(tab, api_url, USER_KEY)
    page.get_by_test_id("model-select").select_option(demo_model["id"])
    expect(page.get_by_test_id("quantize")).to_be_hidden()
    page.get_by_test_id("noise").select_option("discrete")
    # The demo's digits are sixteenths, off the 8-bit grid: refused, with the API's reason.
    npy = tmp_path / "digits.npy"
    np.save(npy, x[:2].numpy())
    page.get_by_test_id("image-input").set_input_files(str(npy))
    page.get_by_test_id("n").fill("2000")
    page.get_by_test_id("submit").click()
    expect(page.get_by_test_id("form-error")).to_contain_text("8-bit grid")

    page.get_by_test_id("quantize").check()
    page.get_by_test_id("submit").click()
    expect(page.get_by_test_id("job-status")).to_have_attribute("data-status", "succeeded")
    job = client.get(f"/v1/jobs/{page.get_by_test_id('job-id').inner_text()}").json()
    assert (job["params"]["noise"], job["params"]["quantize"]) == ("discrete", True)
    assert job["result"]["provenance"]["noise"] == "discrete"
    expect(page.get_by_test_id("job-params")).to_contain_text(
        "discrete noise on the 8-bit grid (inputs rounded onto it)"
    )


def test_cancel_a_long_job(tab, api_url, client, demo_model):
    page = open_page(tab, api_url, USER_KEY)
    page.get_by_test_id("model-select").select_option(demo_model["id"])
    page.get_by_test_id("demo-digit-7").click()
    expect(page.get_by_test_id("labels")).to_have_value("7")
    page.get_by_test_id("mode").select_option("predict")
    page.get_by_test_id("n").fill(
        "2000000"
    )  # the test stack's cap: many seconds of work on these cores
    page.get_by_test_id("submit").click()

    status = page.get_by_test_id("job-status")
    expect(status).to_have_attribute("data-status", "running")
    page.get_by_test_id("cancel").click()
    expect(status).to_have_attribute("data-status", "canceled")
    expect(page.get_by_test_id("cancel")).to_be_disabled()
    job = client.get(f"/v1/jobs/{page.get_by_test_id('job-id').inner_text()}").json()
    assert (
        job["status"] == "canceled"
        and job["progress"]["done"] < job["progress"]["total"] == 2_000_000
    )


def test_the_jobs_table_lists_the_callers_jobs_and_opens_a_dataset_jobs_curve(
    tab, api_url, client, demo_model, digits_test_set
):
    x, y = digits_test_set
    buf = io.BytesIO()
    np.savez(buf, x=x[:3].numpy(), y=y[:3])
    uploaded = upload_dataset(client, buf.getvalue())
    assert uploaded.status_code == 201, uploaded.text
    submitted = client.post(
        "/v1/certify",
        json={
            "model_id": demo_model["id"],
            "dataset_id": uploaded.json()["id"],
            "sigma": 0.25,
            "n": 500,
        },
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    job = wait_job(client, job_id)
    assert job["status"] == "succeeded"
    page = open_page(tab, api_url, USER_KEY)

    table = page.get_by_test_id("jobs-table")
    expect(table.locator(f'tr[data-job-id="{job_id}"]')).to_have_attribute(
        "data-status", "succeeded"
    )
    listed = client.get("/v1/jobs", params={"limit": 20}).json()["jobs"]
    assert listed[0]["id"] == job_id  # newest first
    assert [r.get_attribute("data-job-id") for r in table.locator("tbody tr").all()] == [
        j["id"] for j in listed
    ]

    table.locator(f'tr[data-job-id="{job_id}"]').get_by_test_id("open-job").click()
    expect(page.get_by_test_id("job-id")).to_have_text(job_id)
    expect(page.get_by_test_id("job-status")).to_have_attribute("data-status", "succeeded")
    expect(page.get_by_test_id("rows-table").locator("tbody tr")).to_have_count(3)
    expect(page.get_by_test_id("result-radius")).to_have_text(
        f"{job['result']['results'][0]['radius']:.4f}"
    )
    expect(page.get_by_test_id("curve").locator("img")).to_have_attribute(
        "src", re.compile("^blob:")
    )


@pytest.mark.parametrize(
    ("path", "operation"),
    [("/docs", ".opblock-summary-path"), ("/redoc", '[data-section-id^="operation/"]')],
)
def test_docs_render_every_operation_with_no_internet(tab, api_url, anonymous, path, operation):
    spec = anonymous.get("/openapi.json").json()
    operations = sum(len(item) for item in spec["paths"].values())
    page = tab.page
    page.goto(api_url + path)
    expect(page.locator(operation)).to_have_count(operations)
    if path == "/docs":
        for route in ("/v1/certify", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/models"):
            expect(
                page.locator(f'.opblock-summary-path[data-path="{route}"]').first
            ).to_be_visible()
    else:
        # ReDoc's bundle always asks for its attribution logo from its CDN (no option turns it
        # off); the page's Content-Security-Policy refuses it inside the browser, so nothing is
        # requested from outside (the fixture checks `blocked`). That refusal is the one expected.
        for _ in range(100):  # the refusal reaches the console once the logo is drawn
            if any(REDOC_LOGO in e for e in tab.errors):
                break
            page.wait_for_timeout(100)
        assert any(REDOC_LOGO in e for e in tab.errors), (
            "the logo request was not refused by the policy"
        )
        tab.errors[:] = [e for e in tab.errors if REDOC_LOGO not in e]


def test_an_invalid_request_shows_the_apis_detail_next_to_the_form(tab, api_url, demo_model):
    page = open_page(tab, api_url, USER_KEY)
    page.get_by_test_id("model-select").select_option(demo_model["id"])
    page.get_by_test_id("demo-digit-1").click()
    page.get_by_test_id("sigma").fill("5000")
    page.get_by_test_id("submit").click()
    error = page.get_by_test_id("form-error")
    expect(error).to_be_visible()
    expect(error).to_have_text(re.compile(r"^422: sigma: .*1000"))
    expect(page.get_by_test_id("job-id")).to_be_hidden()  # no job was made


def test_a_wrong_key_shows_the_401_and_leaves_the_page_signed_out(tab, api_url, demo_model):
    page = open_page(tab, api_url, USER_KEY)  # signed in first: the wrong key must undo all of it
    expect(page.get_by_test_id("key-account")).to_have_text("account default · scopes: certify")
    demo = page.get_by_test_id("model-select").locator(f'option[value="{demo_model["id"]}"]')
    expect(demo).to_have_count(1)
    expect(page.get_by_test_id("submit")).to_be_enabled()

    page.get_by_test_id("api-key").fill("not-the-key")
    page.get_by_test_id("save-key").click()
    status = page.get_by_test_id("key-status")
    expect(status).to_have_text("401: invalid API key")
    expect(status).to_have_attribute("data-kind", "error")
    expect(page.get_by_test_id("key-account")).to_be_hidden()
    expect(demo).to_have_count(0)  # the previous key's models are gone
    expect(page.get_by_test_id("jobs-table").locator("tbody tr")).to_have_count(0)
    for locked in ("certify-locked", "jobs-locked", "models-locked"):
        expect(page.get_by_test_id(locked)).to_contain_text("enter and save one above")
    for control in ("submit", "image-input", "model-upload"):
        expect(page.get_by_test_id(control)).to_be_hidden()
        expect(page.get_by_test_id(control)).to_be_disabled()

    page.reload()  # the refused key was not kept for this tab
    expect(page.get_by_test_id("api-key")).to_have_value("")
    expect(status).to_have_text(re.compile("^Enter the API key"))
    expect(page.get_by_test_id("key-account")).to_be_hidden()


def test_a_certify_only_key_shows_its_account_and_offers_no_model_upload(
    tab, api_url, admin, demo_model
):
    made = make_key(admin, "certify")
    account = made["account"]
    try:
        page = open_page(tab, api_url, made["key"])
        who = page.get_by_test_id("key-account")
        expect(who).to_have_text(f"account {account} · scopes: certify")
        expect(who).to_have_attribute("data-admin", "false")
        expect(who).to_have_attribute("title", f"key {made['id']}")

        note = page.get_by_test_id("models-locked")
        expect(note).to_be_visible()
        expect(note).to_have_text(
            f"Uploading a model needs a key with the models scope; this key (account {account}) "
            "has certify."
        )
        for control in ("model-file", "model-name", "model-upload"):
            expect(page.get_by_test_id(control)).to_be_hidden()
            expect(page.get_by_test_id(control)).to_be_disabled()

        # What the certify scope allows is offered: the form, the models, the account's own jobs.
        expect(page.get_by_test_id("certify-locked")).to_be_hidden()
        expect(page.get_by_test_id("submit")).to_be_visible()
        expect(page.get_by_test_id("submit")).to_be_enabled()
        expect(
            page.get_by_test_id("model-select").locator(f'option[value="{demo_model["id"]}"]')
        ).to_have_count(1)
        expect(page.get_by_test_id("jobs-locked")).to_be_hidden()
        expect(page.get_by_test_id("jobs-table").locator("tbody tr")).to_have_text(["no jobs yet"])
    finally:
        assert admin.delete(f"/v1/keys/{made['id']}").status_code == 204


@pytest.mark.parametrize(
    ("scopes", "locked"),
    [
        (["models"], {"certify-locked", "jobs-locked"}),
        (["train"], {"certify-locked", "models-locked"}),
        (["certify", "models"], set()),
        (["admin"], set()),  # the admin scope allows everything, as the API does
    ],
    ids=["models", "train", "certify+models", "admin-scope-only"],
)
def test_each_section_is_offered_only_to_the_scopes_it_needs(tab, api_url, admin, scopes, locked):
    made = make_key(admin, *scopes)
    controls = {
        "certify-locked": "submit",
        "jobs-locked": "jobs-refresh",
        "models-locked": "model-upload",
    }
    try:
        page = open_page(tab, api_url, made["key"])
        admin_mark = " · admin" if "admin" in scopes else ""
        expect(page.get_by_test_id("key-account")).to_have_text(
            f"account {made['account']} · scopes: {', '.join(scopes)}{admin_mark}"
        )
        for note, control in controls.items():
            if note in locked:
                expect(page.get_by_test_id(note)).to_be_visible()
                expect(page.get_by_test_id(note)).to_contain_text(f"has {', '.join(scopes)}.")
                expect(page.get_by_test_id(control)).to_be_hidden()
                expect(page.get_by_test_id(control)).to_be_disabled()
            else:
                expect(page.get_by_test_id(note)).to_be_hidden()
                expect(page.get_by_test_id(control)).to_be_visible()
                expect(page.get_by_test_id(control)).to_be_enabled()
        if "jobs-locked" in locked:
            expect(page.get_by_test_id("jobs-locked")).to_have_text(
                "Jobs need a key with the certify or the train scope; "
                f"this key (account {made['account']}) has {', '.join(scopes)}."
            )
    finally:
        assert admin.delete(f"/v1/keys/{made['id']}").status_code == 204


def test_the_admin_key_is_offered_everything(tab, api_url):
    page = open_page(tab, api_url, ADMIN_KEY)
    who = page.get_by_test_id("key-account")
    expect(who).to_have_text("account admin · scopes: certify, models, train, admin · admin")
    expect(who).to_have_attribute("data-admin", "true")
    for note in ("certify-locked", "job-locked", "jobs-locked", "models-locked"):
        expect(page.get_by_test_id(note)).to_be_hidden()
    for control in ("submit", "jobs-refresh", "model-file", "model-upload"):
        expect(page.get_by_test_id(control)).to_be_visible()
        expect(page.get_by_test_id(control)).to_be_enabled()


def test_the_model_list_shows_visibility_and_owner_where_records_have_them(
    tab, api_url, demo_model
):
    # Records as a server with owners sends them, next to one as an older server does (neither
    # field): the list is rewritten on its way to the page, whatever this server sends itself.
    legacy = {k: v for k, v in demo_model.items() if k not in ("owner", "visibility")}
    records = [
        {**demo_model, "owner": "admin", "visibility": "public"},
        {
            **legacy,
            "id": "private-of-default",
            "name": "mine",
            "owner": "default",
            "visibility": "private",
        },
        {**legacy, "id": "from-an-older-server", "name": "old"},
    ]

    def models(route):
        route.fulfill(response=route.fetch(), json=records)

    tab.page.route("**/v1/models", models)
    page = open_page(tab, api_url, USER_KEY)
    select = page.get_by_test_id("model-select")
    arch = demo_model["arch"]
    expect(select.locator("option")).to_have_text(
        [
            f"digits ({arch}, {demo_model['id']}) · public, owner admin",
            f"mine ({arch}, private-of-default) · private, owner default (this account)",
            f"old ({arch}, from-an-older-server)",
        ]
    )
    expect(select.locator(f'option[value="{demo_model["id"]}"]')).to_have_attribute(
        "data-visibility", "public"
    )
    select.select_option("private-of-default")
    info = page.get_by_test_id("model-info")
    expect(info.locator("dt")).to_contain_text(["visibility", "owner"])
    expect(info.locator("dd")).to_contain_text(["private", "default (this account)"])
    select.select_option("from-an-older-server")
    expect(info.locator("dt")).to_have_text(
        ["architecture", "input shape", "classes", "training σ"]
    )


def test_upload_a_model_as_admin_refused_then_accepted(tab, api_url, admin, demo_paths, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))  # a torch.save zip under a safetensors name
    refusal = upload_model(admin, bad.name, bad.read_bytes())
    assert refusal.status_code == 422
    page = open_page(tab, api_url, ADMIN_KEY)
    message = page.get_by_test_id("model-message")
    page.get_by_test_id("model-file").set_input_files(str(bad))
    page.get_by_test_id("model-upload").click()
    expect(message).to_have_attribute("data-kind", "error")
    expect(message).to_have_text(f"422: {refusal.json()['detail']}")

    page.get_by_test_id("model-file").set_input_files(str(demo_paths["onnx"]))
    page.get_by_test_id("model-name").fill("digits-onnx-from-the-page")
    page.get_by_test_id("model-upload").click()
    expect(message).to_have_attribute("data-kind", "ok")
    [stored] = [
        m for m in admin.get("/v1/models").json() if m["name"] == "digits-onnx-from-the-page"
    ]
    try:
        expect(message).to_contain_text(stored["id"])
        expect(
            page.get_by_test_id("model-select").locator(f'option[value="{stored["id"]}"]')
        ).to_have_count(1)
    finally:
        assert admin.delete(f"/v1/models/{stored['id']}").status_code == 204
