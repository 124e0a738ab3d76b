"""A certificate's report page (service/api/report.py), in-process: statements built with
``certificates.statement`` for a labelled certify job, a predict job and a 300-row dataset job,
rendered and read back with ``html.parser``: the digests, parameters and guarantee are there, at
most 100 rows are listed with a note of the rest, text from the statement is escaped, and the page
names no other origin and needs no inline style or script."""

from __future__ import annotations

import hashlib
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from smoothcert.service.api import report
from smoothcert.service.api.page import CSP
from smoothcert.service.core import certificates
from smoothcert.service.core.jobs import new_job_id

ISSUED = "2026-12-01T07:21:41.512Z"
KEYID = hashlib.sha256(b"a public key").hexdigest()
CERT_SHA = hashlib.sha256(b"an envelope").hexdigest()
HOSTILE = '<script>alert("x")</script>'


class Page(HTMLParser):
    """What a test reads of a page: its elements (tag, attributes), the text of each element with
    an id or data-testid, the rows of each table, and every attribute that names a URL."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.open: list[tuple[str, dict[str, str], list[str]]] = []
        self.text: dict[str, str] = {}
        self.tables: dict[str, list[list[dict]]] = {}  # testid -> [[row attrs, cells...]]
        self.table: list[str] = []
        self.cell: dict | None = None
        self.all_text: list[str] = []
        self.feed(html)
        self.close()

    VOID = frozenset({"meta", "link", "br", "img", "input", "hr", "path", "line", "rect"})

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        if tag == "table":
            self.table.append(a.get("data-testid", ""))
            self.tables.setdefault(self.table[-1], [])
        if tag == "tr" and self.table:
            self.tables[self.table[-1]].append([a])
        if tag in ("td", "th") and self.table and self.tables[self.table[-1]]:
            self.cell = {"attrs": a, "text": ""}
            self.tables[self.table[-1]][-1].append(self.cell)
        if tag not in self.VOID:
            self.open.append((tag, a, []))

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        if tag == "table" and self.table:
            self.table.pop()
        if tag in ("td", "th"):
            self.cell = None
        while self.open:
            name, a, text = self.open.pop()
            joined = "".join(text)
            for key in ("id", "data-testid"):
                if a.get(key):
                    self.text[a[key]] = " ".join(joined.split())
            if self.open:
                self.open[-1][2].append(joined)
            if name == tag:
                break

    def handle_data(self, data):
        self.all_text.append(data)
        if self.open:
            self.open[-1][2].append(data)
        if self.cell is not None:
            self.cell["text"] += data

    def data_rows(self, testid: str) -> list[list[dict]]:
        """The rows of a table's body that stand for inputs (``data-index``)."""
        return [r for r in self.tables[testid] if "data-index" in r[0]]


def model_record(name: str = "digits cnn") -> dict:
    return {
        "id": "m-" + "1" * 8,
        "name": name,
        "sha256": hashlib.sha256(b"model file").hexdigest(),
        "kind": "classifier",
        "format": "onnx",
    }


def certify_rows(n: int, labelled: bool, rng: np.random.Generator) -> list[dict]:
    rows = []
    for i in range(n):
        abstained = i % 7 == 3
        prediction = None if abstained else int(rng.integers(0, 10))
        rows.append(
            {
                "index": i,
                "prediction": prediction,
                "radius": 0.0 if abstained else float(rng.uniform(0, 0.8)),
                "p_a_lower": 0.4 if abstained else float(rng.uniform(0.5, 1)),
                "n_a": 700,
                "n": 1000,
                "radius_cap": 0.7718,
                "votes": {"3": 700, "5": 300},
                "abstained": abstained,
                "label": (prediction if i % 3 else 9)
                if labelled and prediction is not None
                else (1 if labelled else None),
                "elapsed_s": 0.01,
            }
        )
    return rows


def digests_of(n: int) -> list[str]:
    x = np.linspace(0, 1, n * 64, dtype=np.float32).reshape(n, 1, 8, 8)
    return certificates.input_digests(x)


def params(**extra) -> dict:
    return {
        "model_id": "m-" + "1" * 8,
        "mode": "certify",
        "sigma": 0.25,
        "n0": 100,
        "n": 1000,
        "alpha": 0.001,
        "bound": "cohen",
        "batch_size": None,
        "seed": 123456789,
        "num_inputs": 0,
        "runtime": "auto",
        "precision": "float32",
        **extra,
    }


PROVENANCE = {
    "runtime": "onnxruntime",
    "provider": "CPUExecutionProvider",
    "precision": "float32",
    "device": "cpu",
    "batch_size": 1000,
    "versions": {"python": "3.11.2", "smoothcert": "0.9.0", "numpy": "2.1.0"},
    "elapsed_s": 1.5,
}


def render(statement: dict) -> str:
    return report.render_report(statement, CERT_SHA, KEYID)


@pytest.fixture
def labelled_certify() -> dict:
    rows = certify_rows(12, labelled=True, rng=np.random.default_rng(0))
    right = [r["prediction"] is not None and r["prediction"] == r["label"] for r in rows]
    summary = {
        "labelled": len(rows),
        "accuracy": float(np.mean(right)),
        "certified_accuracy": [
            {
                "radius": r,
                "accuracy": float(
                    np.mean([ok and row["radius"] >= r for ok, row in zip(right, rows)])
                ),
            }
            for r in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
        ],
        "acr": float(np.mean([row["radius"] if ok else 0.0 for ok, row in zip(right, rows)])),
    }
    return certificates.statement(
        job={
            "id": new_job_id(),
            "kind": "certify",
            "owner": "alice",
            "params": params(num_inputs=len(rows)),
            "seed_source": "service",
            "provenance": PROVENANCE,
            "summary": summary,
        },
        model=model_record(),
        rows=rows,
        digests=digests_of(len(rows)),
        dataset=None,
        chunks=None,
        issued_time=ISSUED,
    )


def test_a_labelled_certify_job_shows_its_digests_parameters_guarantee_and_summary(
    labelled_certify,
):
    html = render(labelled_certify)
    page = Page(html)
    predicate = labelled_certify["predicate"]
    assert page.text["certificate-sha256"] == CERT_SHA
    assert page.text["keyid"] == KEYID
    assert page.text["model-sha256"] == predicate["model"]["sha256"]
    assert page.text["model-name"] == "digits cnn"
    assert page.text["model-id"] == predicate["model"]["id"]
    assert page.text["account"] == "alice"
    assert page.text["issued-time"] == ISSUED
    assert page.text["seed"] == "123456789 (drawn by the service)"
    for key, label in (("runtime", "onnxruntime"), ("provider", "CPUExecutionProvider")):
        assert page.text[f"provenance-{key}"] == label
    assert page.text["provenance-precision"] == "float32"
    assert "smoothcert 0.9.0" in page.text["provenance-versions"]

    # every parameter, with the certificate's own spelling of its value
    shown = {r[0]["data-param"]: r[2]["text"] for r in page.tables["parameters"][1:]}
    for key, value in predicate["parameters"].items():
        assert shown[key] == ("—" if value is None else str(value)), key

    # the guarantee in words, and its limits
    assert page.text["promise"] == " ".join(predicate["guarantee"].split())
    limits = page.text["limits"]
    for words in (
        "exactly as its SHA-256",
        "smoothed classifier g",
        "not about the base model f",
        "probability at least 1 − α = 0.999",
        "abstained (no prediction) promises nothing",
        "drawn by the service",
        "radius cap",
    ):
        assert words in limits, words

    # one table row per input: its full digest in the title, the label, prediction, radius, p_A
    rows = page.data_rows("rows")
    assert len(rows) == 12 and "more-rows" not in page.text
    for tr, row in zip(rows, predicate["rows"]):
        assert tr[0]["data-index"] == str(row["index"])
        index, digest, label, prediction, radius, p_a = (c["text"] for c in tr[1:])
        assert index == str(row["index"])
        assert digest == row["input_sha256"][:12] + "…"
        assert tr[2]["attrs"]["class"] == "digest"
        assert label == str(row["label"])
        assert prediction == ("abstained" if row["abstained"] else str(row["prediction"]))
        assert (radius, p_a) == (f"{row['radius']:.4f}", f"{row['p_a_lower']:.4f}")
    titles = [a["title"] for tag, a in page.elements if tag == "code" and "data-sha256" in a]
    assert titles == [row["input_sha256"] for row in predicate["rows"]]
    assert all(s["digest"]["sha256"] in html for s in labelled_certify["subject"])

    # the summary: accuracy, ACR, certified accuracy up to the first radius past the cap, curve
    summary = predicate["summary"]
    assert page.text["accuracy"] == f"{100 * summary['accuracy']:.1f}%"
    assert page.text["acr"] == f"{summary['acr']:.4f}"
    [radii, accuracy] = page.tables["certified-accuracy"]
    assert [c["text"] for c in radii[2:]] == ["0", "0.25", "0.5", "0.75", "1"]
    assert [c["text"] for c in accuracy[2:]] == [
        f"{100 * p['accuracy']:.1f}%" for p in summary["certified_accuracy"][:5]
    ]
    svg = [a for tag, a in page.elements if tag == "svg"]
    assert len(svg) == 1 and "xmlns" not in svg[0]
    assert any(tag == "path" and a.get("class") == "curve" for tag, a in page.elements)
    assert any(tag == "line" and a.get("class") == "radius-cap" for tag, a in page.elements)

    # the commands that verify it, with this certificate's SHA-256
    commands = page.text["verify-commands"]
    assert "curl -s $URL/v1/signing-keys > keys.json" in commands
    assert (
        f'curl -s -H "Authorization: Bearer $KEY" $URL/v1/certificates/{CERT_SHA} > cert.json'
        in commands
    )
    assert (
        "smoothcert verify cert.json --keys keys.json --model MODEL_FILE --inputs INPUTS.npy"
        in commands
    )


def test_a_predict_job_shows_p_values_and_no_radius():
    rng = np.random.default_rng(1)
    rows = [
        {
            "index": i,
            "prediction": None if i == 2 else i,
            "p_value": 0.5 if i == 2 else 1e-30,
            "n_a": 600 if i == 2 else 1000,
            "n_b": 400 if i == 2 else 0,
            "n": 1000,
            "votes": {str(i): 1000},
            "abstained": i == 2,
            "label": None,
            "elapsed_s": float(rng.uniform()),
        }
        for i in range(4)
    ]
    statement = certificates.statement(
        job={
            "id": new_job_id(),
            "kind": "predict",
            "owner": "bob",
            "params": params(mode="predict", n=1000, num_inputs=4, seed=7),
            "seed_source": "client",
            "provenance": PROVENANCE,
        },
        model=model_record(),
        rows=rows,
        digests=digests_of(4),
        dataset=None,
        chunks=None,
        issued_time=ISSUED,
    )
    page = Page(render(statement))
    head = [c["text"] for c in page.tables["rows"][0][1:]]
    assert head == ["input", "input SHA-256", "prediction", "p-value", "n_A", "n_B"]
    body = page.data_rows("rows")
    assert [[c["text"] for c in tr[1:]][2:] for tr in body] == [
        ["0", "1e-30", "1000", "0"],
        ["1", "1e-30", "1000", "0"],
        ["abstained", "0.5", "600", "400"],
        ["3", "1e-30", "1000", "0"],
    ]
    assert "Prediction certificate" in "".join(page.all_text)
    limits = page.text["limits"]
    assert "certifies no radius" in limits and "chosen by the client" in limits
    assert "with many seeds" in limits
    assert page.text["seed"] == "7 (chosen by the client)"
    assert "the class that the smoothed classifier" in page.text["promise"]
    assert "summary" not in page.text and "curve" not in page.text  # no labels: no summary


def test_a_dataset_job_lists_100_rows_and_says_how_many_more():
    rows = certify_rows(300, labelled=True, rng=np.random.default_rng(2))
    dataset = {"id": "d-" + "2" * 8, "name": "digits test", "arrays_sha256": "ab" * 32}
    statement = certificates.statement(
        job={
            "id": new_job_id(),
            "kind": "certify",
            "owner": "carol",
            "params": params(
                num_inputs=300,
                dataset_id=dataset["id"],
                skip=0,
                limit=None,
                chunk_size=100,
                chunks=3,
            ),
            "seed_source": "service",
            "provenance": PROVENANCE,
        },
        model=model_record(),
        rows=rows,
        digests=digests_of(300),
        dataset=dataset,
        chunks=[{"index": i, "skip": 100 * i, "count": 100, "seed": 10 + i} for i in range(3)],
        issued_time=ISSUED,
    )
    html = render(statement)
    page = Page(html)
    body = page.data_rows("rows")
    assert len(body) == report.MAX_ROWS == 100
    assert [tr[0]["data-index"] for tr in body] == [str(i) for i in range(100)]
    assert page.text["more-rows"] == "… and 200 more rows (of 300), in the certificate's JSON."
    assert page.text["dataset-sha256"] == "ab" * 32
    assert page.text["dataset-name"] == "digits test"
    assert "3, each with its own seed" in page.text["dataset"]
    digests = statement["predicate"]["rows"]
    assert all(d["input_sha256"] in html for d in digests[:100])
    assert not any(d["input_sha256"] in html for d in digests[100:])
    assert "--dataset DATA.npz" in page.text["verify-commands"]
    assert "--inputs" not in page.text["verify-commands"]
    # no summary in the statement: computed from all 300 signed rows, and said so
    right = [r["prediction"] is not None and r["prediction"] == r["label"] for r in rows]
    assert page.text["accuracy"] == f"{100 * np.mean(right):.1f}%"
    assert "Computed here from the certificate's rows" in page.text["summary"]
    assert page.tables["certified-accuracy"][0][2]["text"] == "0"


def test_text_from_the_statement_is_escaped(labelled_certify):
    predicate = labelled_certify["predicate"]
    predicate["model"]["name"] = HOSTILE
    predicate["requested_by"]["account"] = HOSTILE
    predicate["parameters"]["runtime"] = HOSTILE
    predicate["provenance"] = {**predicate["provenance"], "provider": HOSTILE}
    predicate["rows"][0]["input_sha256"] = '"><script>x</script>'
    predicate["issued_time"] = "<img src=x onerror=alert(1)>"
    html = report.render_report(labelled_certify, "<b>", '"><i>')
    page = Page(html)
    assert not [tag for tag, _ in page.elements if tag in ("script", "img", "b", "i", "iframe")]
    assert "<script" not in html.lower()
    assert page.text["model-name"] == HOSTILE and page.text["account"] == HOSTILE
    assert page.text["provenance-provider"] == HOSTILE
    assert page.text["certificate-sha256"] == "<b>"
    assert not any(k.startswith("on") for _, a in page.elements for k in a)


def test_the_page_names_no_other_origin_and_fits_the_pages_policy(labelled_certify):
    html = render(labelled_certify)
    page = Page(html)
    # the only absolute URLs are the statement's type URIs, shown as text
    uris = set(re.findall(r"https?://[^\s\"'<>]*", html))
    assert uris == {certificates.STATEMENT_TYPE, certificates.PREDICATE_TYPE}
    text = "".join(page.all_text)
    assert all(u in text for u in uris)
    for tag, attrs in page.elements:
        for name in ("href", "src", "action", "formaction", "xlink:href", "data", "poster"):
            if name in attrs:
                url = attrs[name]
                assert url.startswith(("/", "#")) and not url.startswith("//"), (tag, url)
    # the policy the web page is served with: no script at all, no inline style
    assert "script-src" not in CSP and "default-src 'self'" in CSP
    assert not [tag for tag, _ in page.elements if tag in ("script", "style", "iframe", "object")]
    assert not [tag for tag, a in page.elements if "style" in a]
    [stylesheet] = [a for tag, a in page.elements if tag == "link" and a.get("rel") == "stylesheet"]
    assert stylesheet["href"] == report.STYLESHEET == "/ui/report.css"
    # ... which ships with the web page's files
    shipped = report.__file__.rsplit("/", 1)[0] + "/static/ui/report.css"
    with open(shipped, encoding="utf-8") as f:
        assert "@media print" in f.read()
