"""A certificate as one printable HTML page for people (``GET /v1/jobs/{id}/report.html``).

:func:`render_report` turns the in-toto statement of a job's certificate
(:mod:`smoothcert.service.core.certificates`) into a page that says what was certified and what
is not promised, the model, dataset, parameters, seed, who asked and when, what ran it, the first
:data:`MAX_ROWS` rows, the summary of a labelled job with its certified-accuracy curve (inline
SVG, :func:`smoothcert.service.api.pictures.accuracy_curve_svg`), and the commands that verify the
signed certificate offline.

The page is the API's to serve under a same-origin Content-Security-Policy (``default-src
'self'``, as the web page's in :mod:`smoothcert.service.api.page`): it has no script, no inline
style (no ``<style>`` element, no ``style`` attribute), and one stylesheet, :data:`STYLESHEET`,
from the web page's folder on the same origin; the inline SVG draws with presentation attributes
only. It asks for nothing from another origin. Every text taken from the statement is escaped.
The page is a reading aid, not the certificate: only the signed JSON envelope is signed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

from smoothcert.service.api.pictures import accuracy_curve_svg
from smoothcert.service.core.accuracy import (
    DEFAULT_CURVE_RADII,
    average_certified_radius,
    certified_accuracy,
)

Fact = tuple[str, str, str | None]  # label, HTML already escaped, test id (or None)

MAX_ROWS = 100  # rows shown in the table; the certificate's JSON has them all
STYLESHEET = "/ui/report.css"  # service/api/static/ui/report.css, served by page.py's mount
SHORT_DIGEST = 12  # hex digits of a digest shown in the table (the full one in its title)

# The parameters people read first, in this order, each with what it means; others follow as given.
PARAMETERS: dict[str, str] = {
    "mode": "certify (a radius), predict (a class only) or a test at a target radius",
    "sigma": "σ: the standard deviation of the Gaussian noise, in [0, 1] pixel units",
    "n0": "noisy copies drawn to choose the class",
    "n": "noisy copies drawn to bound its probability (the cap of a target-radius test)",
    "alpha": "α: the chance, per row, that the guarantee fails",
    "bound": "how p_A is bounded (cohen: one-sided Clopper–Pearson; top2: with p_B too)",
    "target_radius": "the radius each row was tested at",
    "seed": "the seed of the noise",
    "batch_size": "noisy copies per batch (asked for; the one used is under Runtime)",
    "runtime": "the runtime asked for",
    "precision": "the precision asked for",
    "num_inputs": "inputs in the job",
    "model_id": "the model",
    "dataset_id": "the dataset",
    "skip": "dataset rows skipped before the first one certified",
    "limit": "dataset rows certified at most",
}
# What ran the job, from the worker's provenance, in this order.
PROVENANCE: dict[str, str] = {
    "runtime": "runtime",
    "provider": "provider",
    "precision": "precision",
    "device": "device",
    "batch_size": "batch size used",
    "requested_batch_size": "batch size asked for",
    "runtime_choice": "how the runtime was chosen",
    "model_sha256": "model SHA-256 as loaded",
    "samples_used": "noisy samples used",
    "elapsed_s": "elapsed (s)",
}


def render_report(statement: Mapping[str, Any], certificate_sha256: str, keyid: str) -> str:
    """The page of the certificate whose envelope has SHA-256 ``certificate_sha256``, signed with
    key ``keyid``, and whose payload is ``statement`` (the module's docstring)."""
    predicate = statement.get("predicate") or {}
    params = predicate.get("parameters") or {}
    rows = list(predicate.get("rows") or [])
    job = predicate.get("job") or {}
    mode = str(params.get("mode") or job.get("kind") or "certify")
    predict = mode == "predict" or job.get("kind") == "predict"
    title = "Prediction certificate" if predict else "Robustness certificate"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{_e(title)} · job {_e(job.get('id'))} · smoothcert</title>",
        f'<link rel="stylesheet" href="{STYLESHEET}">',
        "</head>",
        "<body>",
        '<main class="report">',
        _header(title, statement, predicate, certificate_sha256, keyid),
        _guarantee(predicate, params, predict),
        _model(predicate),
        _dataset(predicate, params),
        _parameters(params, predicate),
        _request(predicate, job),
        _runtime(predicate),
        _rows(rows, predict, mode),
        _summary(predicate, rows, predict, params),
        _verify(predicate, certificate_sha256, keyid),
        "</main>",
        "</body>",
        "</html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


# ---------------------------------------------------------------------------- sections


def _header(
    title: str,
    statement: Mapping[str, Any],
    predicate: Mapping[str, Any],
    certificate_sha256: str,
    keyid: str,
) -> str:
    job = predicate.get("job") or {}
    facts: list[Fact] = [
        ("certificate SHA-256", _code(certificate_sha256), "certificate-sha256"),
        ("signed with key", _code(keyid), "keyid"),
        ("issued", _e(predicate.get("issued_time")), "issued-time"),
        ("job", f"{_code(job.get('id'))} ({_e(job.get('kind'))})", "job"),
        ("statement type", _code(statement.get("_type")), None),
        ("predicate type", _code(statement.get("predicateType")), None),
    ]
    return (
        '<header class="head">\n'
        f"<h1>{_e(title)}</h1>\n"
        '<p class="lede">Randomized smoothing (Cohen, Rosenfeld &amp; Kolter, 2019), issued and '
        "signed by this smoothcert service. This page is a reading of the certificate; only the "
        'signed JSON (see <a href="#verify">Verify it</a>) is evidence.</p>\n'
        f"{_facts(facts, 'certificate')}\n"
        "</header>"
    )


def _guarantee(predicate: Mapping[str, Any], params: Mapping[str, Any], predict: bool) -> str:
    alpha: Any = params.get("alpha")
    confidence = f"1 − α = {_num(1 - float(alpha))}" if _is_number(alpha) else "1 − α"
    seed = predicate.get("seed") or {}
    limits = [
        "It holds only for each input exactly as its SHA-256 below describes: the array of "
        "float32 values in [0, 1] (channels, height, width) the service certified. A re-encoded, "
        "resized, cropped or otherwise changed image is another input, and nothing here covers it.",
        "It is about the smoothed classifier g, which votes over noisy copies of the input, not "
        "about the base model f alone: f on the clean input, or on one noisy copy, may answer "
        "differently, and f itself is not certified robust.",
        f"Each row holds with probability at least {confidence} over the sampling, row by row: "
        "it is not a promise about all rows at once: over many rows, on average up to a share α of "
        "them may be wrong.",
        "A row that abstained (no prediction) promises nothing, not even that the input is hard.",
    ]
    if predict:
        limits.append(
            "A predict row certifies no radius: it says which class g returns at the input "
            "itself, nothing about points near it."
        )
    elif params.get("target_radius") is not None:
        limits.append(
            "A row not certified at the target radius promises nothing; the radius a row "
            "reports is a lower bound valid when its test stopped."
        )
    else:
        limits.append(
            "No row can be certified beyond its radius cap (the radius of a unanimous vote with "
            "these n, α and σ); a small radius may mean too few samples, not a fragile input."
        )
    source = seed.get("source")
    if source == "client":
        limits.append(
            f"The seed ({_e(seed.get('value'))}) was chosen by the client. The run can be "
            "reproduced from it, but a client who chooses seeds can run the same inputs with many "
            "seeds and keep the best certificate, which voids the 1 − α promise: trust a "
            "client-chosen seed only as far as you trust the client."
        )
    elif source == "service":
        limits.append(
            f"The seed ({_e(seed.get('value'))}) was drawn by the service when it accepted the "
            "job, so the client could not pick the noise; the run can be reproduced from it. It "
            "does not stop a client from submitting the same inputs again and keeping the best "
            "of several certificates."
        )
    else:
        limits.append(
            f"The certificate does not say where the seed ({_e(seed.get('value'))}) came from."
        )
    items = "\n".join(f"<li>{item}</li>" for item in limits)
    return (
        '<section id="guarantee" data-testid="guarantee">\n'
        "<h2>What it promises</h2>\n"
        f'<p class="promise" data-testid="promise">{_e(predicate.get("guarantee"))}</p>\n'
        "<h3>What it does not promise</h3>\n"
        f'<ul class="limits" data-testid="limits">\n{items}\n</ul>\n'
        "</section>"
    )


def _model(predicate: Mapping[str, Any]) -> str:
    model = predicate.get("model") or {}
    facts: list[Fact] = [
        ("name", _e(model.get("name")), "model-name"),
        ("id", _code(model.get("id")), "model-id"),
        ("SHA-256", _code(model.get("sha256")), "model-sha256"),
    ]
    for key in ("kind", "format", "arch"):
        if model.get(key) is not None:
            facts.append((key, _e(model[key]), None))
    parts = model.get("parts")
    if parts:
        facts.append(("parts", _code(_json(parts)), None))
    return _facts_section(
        "model",
        "Model",
        facts,
        "The base classifier f, named by the SHA-256 of its file (a pipeline: of its parts).",
    )


def _dataset(predicate: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    dataset = predicate.get("dataset")
    if not dataset:
        return ""
    facts: list[Fact] = [
        ("name", _e(dataset.get("name")), "dataset-name"),
        ("id", _code(dataset.get("id")), "dataset-id"),
        ("arrays SHA-256", _code(dataset.get("arrays_sha256")), "dataset-sha256"),
    ]
    skip, limit = params.get("skip"), params.get("limit")
    if isinstance(skip, int):
        most = f", at most {limit} rows" if isinstance(limit, int) else ", to its end"
        facts.append(("rows certified", f"from row {skip}{most}", None))
    for key, value in dataset.items():
        if key not in ("id", "name", "arrays_sha256"):
            facts.append((str(key), _e(_value(value)), None))
    chunks = predicate.get("chunks") or []
    if chunks:
        facts.append(
            ("chunks", f"{len(chunks)}, each with its own seed (listed in the certificate)", None)
        )
    return _facts_section(
        "dataset",
        "Dataset",
        facts,
        "The SHA-256 is of the arrays as stored (names, types, shapes, bytes), not of an .npz "
        "file's bytes.",
    )


def _parameters(params: Mapping[str, Any], predicate: Mapping[str, Any]) -> str:
    ordered = [k for k in PARAMETERS if k in params] + sorted(
        str(k) for k in params if k not in PARAMETERS
    )
    body = "\n".join(
        f'<tr data-param="{_e(k)}"><th scope="row"><code>{_e(k)}</code></th>'
        f"<td><code>{_e(_value(params[k]))}</code></td>"
        f'<td class="hint">{_e(PARAMETERS.get(k, ""))}</td></tr>'
        for k in ordered
    )
    return (
        '<section id="parameters">\n<h2>Parameters</h2>\n'
        '<table class="params" data-testid="parameters">\n'
        "<thead><tr><th>name</th><th>value</th><th>meaning</th></tr></thead>\n"
        f"<tbody>\n{body}\n</tbody>\n</table>\n</section>"
    )


def _request(predicate: Mapping[str, Any], job: Mapping[str, Any]) -> str:
    requested = predicate.get("requested_by") or {}
    seed = predicate.get("seed") or {}
    source = {"client": "chosen by the client", "service": "drawn by the service"}.get(
        str(seed.get("source")), "source not recorded"
    )
    facts: list[Fact] = [
        ("account", _e(requested.get("account")), "account"),
        ("certificate issued", _e(predicate.get("issued_time")), None),
        ("job", f"{_code(job.get('id'))} ({_e(job.get('kind'))})", None),
        ("seed", f"{_code(_value(seed.get('value')))} ({_e(source)})", "seed"),
    ]
    return _facts_section("request", "Who asked, and when", facts)


def _runtime(predicate: Mapping[str, Any]) -> str:
    provenance = predicate.get("provenance") or {}
    facts: list[Fact] = [
        (label, _e(_value(provenance[key])), f"provenance-{key}")
        for key, label in PROVENANCE.items()
        if provenance.get(key) is not None
    ]
    versions = provenance.get("versions")
    if isinstance(versions, Mapping) and versions:
        text = ", ".join(f"{k} {v}" for k, v in versions.items())
        facts.append(("software", _e(text), "provenance-versions"))
    if not facts:
        facts.append(("", "the certificate records no provenance", None))
    return _facts_section(
        "runtime",
        "What ran it",
        facts,
        "As the worker reported it; the certificate keeps the whole provenance.",
    )


def _rows(rows: Sequence[Mapping[str, Any]], predict: bool, mode: str) -> str:
    shown = rows[:MAX_ROWS]
    sequential = any("certified_at_r" in r for r in shown)
    labelled = any(r.get("label") is not None for r in shown)
    heads = ["input", "input SHA-256"]
    heads += ["label"] if labelled else []
    heads += ["prediction"]
    if predict:
        heads += ["p-value", "n_A", "n_B"]
    else:
        heads += ["radius", "p_A lower"] + (["certified at r"] if sequential else [])
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in heads)
    lines = []
    for row in shown:
        digest = str(row.get("input_sha256") or "")
        cells = [
            f"<td>{_e(row.get('index'))}</td>",
            f'<td class="digest"><code title="{_e(digest)}" data-sha256="{_e(digest)}">'
            f"{_e(digest[:SHORT_DIGEST])}…</code></td>",
        ]
        if labelled:
            cells.append(f"<td>{_e(_value(row.get('label')))}</td>")
        abstained = row.get("abstained") or row.get("prediction") is None
        cells.append(
            '<td class="abstained">abstained</td>'
            if abstained
            else f"<td>{_e(_value(row.get('prediction')))}</td>"
        )
        if predict:
            cells += [
                f"<td>{_e(_fixed(row.get('p_value'), 4, general=True))}</td>",
                f"<td>{_e(_value(row.get('n_a')))}</td>",
                f"<td>{_e(_value(row.get('n_b')))}</td>",
            ]
        else:
            cells += [
                f"<td>{_e(_fixed(row.get('radius'), 4))}</td>",
                f"<td>{_e(_fixed(row.get('p_a_lower'), 4))}</td>",
            ]
            if sequential:
                cells.append(f"<td>{'yes' if row.get('certified_at_r') else 'no'}</td>")
        lines.append(f'<tr data-index="{_e(row.get("index"))}">{"".join(cells)}</tr>')
    more = len(rows) - len(shown)
    note = (
        f'<p class="more" data-testid="more-rows" data-more="{more}">… and {more} more '
        f"row{'s' if more != 1 else ''} (of {len(rows)}), in the certificate's JSON.</p>\n"
        if more > 0
        else ""
    )
    what = (
        "the class g returns, or abstained; the p-value of its count against the runner-up's"
        if predict
        else "the class g returns and the ℓ2 radius (in [0, 1] pixel units) within which it "
        "cannot change, or abstained"
    )
    return (
        '<section id="rows">\n'
        f'<h2>Rows <span class="count">({len(rows)} input{"s" if len(rows) != 1 else ""})</span></h2>\n'
        f'<p class="hint">Per input: {what}. Hover a digest for all of it.</p>\n'
        '<table class="rows" data-testid="rows">\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(lines) + "\n</tbody>\n</table>\n"
        f"{note}</section>"
    )


def _summary(
    predicate: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    predict: bool,
    params: Mapping[str, Any],
) -> str:
    labelled_rows = [r for r in rows if r.get("label") is not None]
    summary = dict(predicate.get("summary") or {})
    if not summary and not labelled_rows:
        return ""
    computed = not summary
    if computed:  # a certificate without a summary: the same figures from its signed rows
        summary = _summary_of(labelled_rows, predict)
    facts: list[Fact] = [
        ("labelled rows", _e(_value(summary.get("labelled", len(labelled_rows)))), None),
        ("accuracy", _e(_percent(summary.get("accuracy"))), "accuracy"),
    ]
    if not predict and summary.get("acr") is not None:
        facts.append(("ACR", _e(_fixed(summary.get("acr"), 4)), "acr"))
    parts = [
        '<section id="summary">\n<h2>Summary of the labelled rows</h2>',
        '<p class="hint">Accuracy: the share of labelled rows whose prediction is the label (an '
        "abstention is never right). "
        + (
            ""
            if predict
            else "ACR: the average certified radius, counting a wrong or abstained row as 0. "
            "Certified accuracy at r: the share right and certified at radius ≥ r."
        )
        + (" Computed here from the certificate's rows." if computed else "")
        + "</p>",
        _facts(facts, "summary"),
    ]
    if not predict:
        curve = _curve_points(summary, labelled_rows, rows)
        if curve:
            head = "".join(f'<th scope="col">{_e(_num(r))}</th>' for r, _ in curve)
            cells = "".join(f"<td>{_e(_percent(a))}</td>" for _, a in curve)
            parts.append(
                '<table class="curve-table" data-testid="certified-accuracy">\n'
                f'<thead><tr><th scope="row">radius</th>{head}</tr></thead>\n'
                f'<tbody><tr><th scope="row">certified accuracy</th>{cells}</tr></tbody>\n'
                "</table>"
            )
        if labelled_rows and all(r.get("radius") is not None for r in labelled_rows):
            caps = [float(r["radius_cap"]) for r in rows if _is_number(r.get("radius_cap"))]
            sigma = params.get("sigma")
            title = "Certified accuracy" + (f", σ = {_num(sigma)}" if _is_number(sigma) else "")
            svg = accuracy_curve_svg(
                [dict(r) for r in labelled_rows], max(caps) if caps else None, title
            )
            parts.append(
                '<figure class="curve" data-testid="curve">\n'
                + _inline_svg(svg)
                + "<figcaption>Certified accuracy against radius; the dashed line is the radius "
                "cap, past which no row can be certified with these n, α and σ.</figcaption>\n"
                "</figure>"
            )
    parts.append("</section>")
    return "\n".join(parts)


def _verify(predicate: Mapping[str, Any], certificate_sha256: str, keyid: str) -> str:
    dataset = bool(predicate.get("dataset"))
    data = "--dataset DATA.npz" if dataset else "--inputs INPUTS.npy"
    commands = [
        "curl -s $URL/v1/signing-keys > keys.json",
        f'curl -s -H "Authorization: Bearer $KEY" $URL/v1/certificates/{certificate_sha256} '
        "> cert.json",
        f"sha256sum cert.json    # {certificate_sha256}",
        f"smoothcert verify cert.json --keys keys.json --model MODEL_FILE {data}",
    ]
    model = predicate.get("model") or {}
    what = (
        "DATA.npz the dataset file (its arrays' SHA-256 must be the one above)"
        if dataset
        else "INPUTS.npy the inputs as you sent them"
    )
    return (
        '<section id="verify">\n<h2>Verify it</h2>\n'
        "<p>The signed certificate is a DSSE envelope whose SHA-256 is its name. Where "
        "<code>URL</code> is this service's address and <code>KEY</code> an API key of the "
        "account that asked:</p>\n"
        f'<pre data-testid="verify-commands"><code>{_e(chr(10).join(commands))}</code></pre>\n'
        f"<p><code>smoothcert verify</code> checks the Ed25519 signature against the service's "
        f"published keys (this one was signed with key <code>{_e(keyid)}</code>) and that the "
        "files you give are the ones the certificate names: MODEL_FILE the model file (SHA-256 "
        f"<code>{_e(model.get('sha256'))}</code>), {_e(what)}.</p>\n"
        "</section>"
    )


# ---------------------------------------------------------------------------- figures


def _summary_of(rows: Sequence[Mapping[str, Any]], predict: bool) -> dict[str, Any]:
    right = [
        r.get("prediction") is not None and r.get("prediction") == r.get("label") for r in rows
    ]
    out: dict[str, Any] = {
        "labelled": len(rows),
        "accuracy": sum(right) / len(rows) if rows else None,
    }
    if not predict and rows and all(_is_number(r.get("radius")) for r in rows):
        out["acr"] = average_certified_radius(right, [float(r["radius"]) for r in rows])
    return out


def _curve_points(
    summary: Mapping[str, Any],
    labelled: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
) -> list[tuple[float, float]]:
    """Certified accuracy at the standard radii (the summary's, else computed from the rows), up
    to the first radius past every row's radius cap (beyond it every entry is 0)."""
    given = summary.get("certified_accuracy")
    points: list[tuple[float, float]] = []
    if isinstance(given, list):
        points = [
            (float(p["radius"]), float(p["accuracy"]))
            for p in given
            if isinstance(p, Mapping)
            and _is_number(p.get("radius"))
            and _is_number(p.get("accuracy"))
        ]
    elif labelled and all(_is_number(r.get("radius")) for r in labelled):
        right = [
            r.get("prediction") is not None and r.get("prediction") == r.get("label")
            for r in labelled
        ]
        shares = certified_accuracy(
            right, [float(r["radius"]) for r in labelled], DEFAULT_CURVE_RADII
        )
        points = [(float(r), float(a)) for r, a in zip(DEFAULT_CURVE_RADII, shares)]
    caps = [float(r["radius_cap"]) for r in rows if _is_number(r.get("radius_cap"))]
    if caps and points:
        cap = max(caps)
        past = [i for i, (r, _) in enumerate(points) if r > cap]
        if past:
            points = points[: past[0] + 1]
    return points


def _inline_svg(svg: str) -> str:
    """``accuracy_curve_svg``'s document as an element of the page: in HTML an ``<svg>`` is in
    the SVG namespace already, so the namespace declaration (a URI, never fetched) is left out."""
    return svg.replace(' xmlns="http://www.w3.org/2000/svg"', "", 1).replace(
        "<svg ", '<svg role="img" aria-label="certified accuracy against radius" ', 1
    )


# ---------------------------------------------------------------------------- text


def _e(value: Any) -> str:
    """``value`` as escaped text (None: a dash)."""
    return "—" if value is None else escape(str(value), quote=True)


def _code(value: Any) -> str:
    return f"<code>{_e(value)}</code>"


def _facts_section(name: str, title: str, facts: Iterable[Fact], hint: str = "") -> str:
    """A section ``name`` headed ``title``: the ``hint`` (HTML) if any, then :func:`_facts`."""
    hint_html = f'<p class="hint">{hint}</p>\n' if hint else ""
    return f'<section id="{name}">\n<h2>{title}</h2>\n{hint_html}{_facts(facts, name)}\n</section>'


def _facts(facts: Iterable[Fact], name: str) -> str:
    """A definition list of (label, HTML already escaped, test id or None)."""
    items = "\n".join(
        f"<dt>{_e(label)}</dt><dd{_testid(testid)}>{html}</dd>" for label, html, testid in facts
    )
    return f'<dl class="facts" data-testid="{_e(name)}">\n{items}\n</dl>'


def _testid(testid: str | None) -> str:
    return f' data-testid="{_e(testid)}"' if testid else ""


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _value(value: Any) -> str:
    """A value as the certificate's JSON spells it (a string without its quotes)."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return _json(value)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _num(value: Any) -> str:
    return f"{float(value):g}" if _is_number(value) else _value(value)


def _fixed(value: Any, digits: int, general: bool = False) -> str:
    if not _is_number(value):
        return _value(value)
    return f"{float(value):.{digits}g}" if general else f"{float(value):.{digits}f}"


def _percent(value: Any) -> str:
    return f"{100 * float(value):.1f}%" if _is_number(value) else _value(value)
