"""`smoothcert verify CERT.json`: check a certificate offline, with no server and no GPU.

A certificate (:mod:`smoothcert.service.core.certificates`) is an in-toto statement in a DSSE
envelope signed with one of the service's Ed25519 keys. The checks, each one line on stderr:

- **signature**: the envelope's signature holds for one of the keys given (``--key PUB.pem``,
  repeatable, or ``--keys keys.json``, the saved answer of ``GET /v1/signing-keys``; a retired
  key still verifies what it signed). One of the two is required for a signed envelope; an
  unsigned one (``smoothcert certify --certificate`` without ``--signing-key``) is said to be
  unsigned, and its other checks still run (a failure when keys were given).
- **statement**: the payload is a statement of this format, and its parts agree with one
  another: the subjects name the model, the dataset and one input per row with the digests the
  predicate repeats, the parameters match the worker's provenance, the seed is the parameters'.
- **model** (``--model FILE``): the file's SHA-256 is the model subject's. A pipeline's subject
  is the digest of its two parts' digests, so ``--model`` is accepted for single models only.
- **inputs** (``--inputs``: one .npy of floats in [0, 1] or uint8 pixels, (N, C, H, W) or
  (C, H, W), or PNG/JPEG files and folders decoded as the service decodes them): each input's
  digest is the digest of the row in the same place. An image is decoded both as grey and as RGB
  (the model's channel count decides which the service used, and the certificate does not name
  it), and matches when either digest is the row's.
- **dataset** (``--dataset FILE.npz``, a dataset job): the arrays' digest, in the form the
  service stores them, is the dataset subject's, and each row's input (``x[index]`` scaled to
  [0, 1] as the worker scales it) has the row's digest.
- **arithmetic**: every row recomputed from its counts with the statistics the engine used
  (:mod:`smoothcert.worker.smoothing.bounds`, numpy and scipy, no torch), to an absolute
  tolerance of 1e-12. CERTIFY with ``cohen``: votes sum to n, n_A is the votes of the prediction,
  p_A_lower is the Clopper-Pearson bound of n_A in n at alpha, the row abstains iff it is below
  1/2, the radius is sigma * Phi^-1(p_A_lower) (0 on abstention), radius_cap is sigma *
  Phi^-1(alpha^(1/n)). With ``top2``, p_A_lower, p_B_upper and the radius come from the row's
  votes over K classes; K is not in the certificate, so it is the least K whose radius_cap is the
  recorded one (radius_cap falls as K grows). PREDICT: n_A and n_B are the two largest vote
  counts, the p-value is the two-sided binomial test's, the row abstains iff it is above alpha.
  At a target radius: the radius is sigma * Phi^-1(p_A_lower) when p_A_lower > 1/2 (else 0 and no
  prediction), a certified row has a prediction, and the counts agree with n0 and the cap; the
  sequential test's e-value itself is not recomputed. A dataset job's chunks have the seeds
  :func:`~smoothcert.service.core.contract.chunk_seed` gives. The summary's accuracy, certified
  accuracy at its radii and ACR (the mean over labelled rows of the radius where the prediction
  is the label, 0 elsewhere) are recomputed from the rows.
- **recompute** (``--recompute``, needs torch, ``--model`` and the inputs): see
  :func:`_recompute`.

Exit status 0 when every check asked for holds, 1 with one line per failure (the check and the
row), 2 when an argument or file cannot be used. Checks other than recompute import no torch.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import secrets
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

TOLERANCE = 1e-12  # absolute, on every recomputed probability, p-value and radius
MAX_CLASSES = 1 << 20  # the most classes the top2 search for K considers
MAX_LINES = 20  # failure lines printed per check; the rest are counted
MAX_DATASET_BYTES = 1 << 40  # the unzipped size cap when a local .npz is read (it is the user's)


class _Broken(Exception):
    """The statement lacks something every certificate has; the message says what."""


@dataclass
class Report:
    """What each check found: lines for stderr, and whether any check failed."""

    lines: list[str] = field(default_factory=list)
    failed: bool = False

    def ok(self, check: str, text: str) -> None:
        self.lines.append(f"{check}: ok ({text})" if text else f"{check}: ok")

    def fail(self, check: str, problems: Sequence[str]) -> None:
        self.failed = True
        for problem in problems[:MAX_LINES]:
            self.lines.append(f"{check}: {problem}")
        if len(problems) > MAX_LINES:
            self.lines.append(f"{check}: ... and {len(problems) - MAX_LINES} more")

    def check(self, check: str, problems: Sequence[str], text: str) -> None:
        if problems:
            self.fail(check, problems)
        else:
            self.ok(check, text)


# ------------------------------------------------------------------------------------- the command


def add_command(commands) -> None:
    """Register ``smoothcert verify`` with the subcommands of ``smoothcert``."""
    p = commands.add_parser(
        "verify",
        help="check a certificate offline: signature, digests, arithmetic (--recompute: rerun it)",
        description=(
            "Check a certificate (GET /v1/jobs/{id}/certificate) offline. Exit 0 when every check "
            "holds, 1 when one fails (one line per failure), 2 for unusable arguments."
        ),
    )
    p.add_argument("certificate", metavar="CERT.json", help="the certificate (a DSSE envelope)")
    keys = p.add_argument_group("the service's public keys (one of these is required)")
    keys.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="PUB.pem",
        help="an Ed25519 public key (PEM); may be repeated",
    )
    keys.add_argument(
        "--keys",
        metavar="KEYS.json",
        help="the saved answer of GET /v1/signing-keys (retired keys verify what they signed)",
    )
    p.add_argument(
        "--model", metavar="FILE", help="the model file: its SHA-256 must be the certificate's"
    )
    p.add_argument(
        "--inputs",
        nargs="+",
        action="extend",
        metavar="PATH",
        help="the inputs, in row order: one .npy (floats in [0,1] or uint8), or PNG/JPEG files "
        "or folders of them",
    )
    p.add_argument(
        "--dataset", metavar="FILE.npz", help="the dataset file of a dataset job (x and y)"
    )
    p.add_argument(
        "--recompute",
        action="store_true",
        help="rerun the job here with its seed (rows that match exactly), then with a fresh seed "
        "(the bounds must stay consistent); needs torch, --model and the inputs",
    )
    p.add_argument("--device", default="cpu", help="--recompute's device (default cpu)")
    p.add_argument(
        "--recompute-seed",
        type=int,
        metavar="SEED",
        help="the fresh rerun's seed (default: drawn; printed)",
    )
    p.add_argument(
        "--recompute-alpha",
        type=float,
        metavar="A",
        help="the fresh rerun's level: a certificate whose bounds hold fails it with probability "
        "at most A (default: the certificate's alpha)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """The handler of ``smoothcert verify``: 0, 1 or 2 (ValueError, which main turns into 2)."""
    envelope = _read_json(args.certificate, "the certificate")
    if not isinstance(envelope, dict) or "payload" not in envelope:
        raise ValueError(f"{args.certificate}: not a DSSE envelope (no payload)")
    signed = bool(envelope.get("signatures"))
    if signed and not args.key and not args.keys:
        raise ValueError("give the service's public keys: --key PUB.pem or --keys keys.json")
    if args.recompute and not (args.model and (args.inputs or args.dataset)):
        raise ValueError("--recompute needs --model and the inputs (--inputs or --dataset)")
    keys, retired = _public_keys(args.key, args.keys) if args.key or args.keys else ({}, {})

    report = Report()
    if signed:
        document = _signature(envelope, keys, retired, report)
    else:
        document = _unsigned(envelope, bool(keys), report)
    if document is None:
        _print(report)
        return 1
    try:
        cert = _Cert.read(document)
        report.check("statement", cert.consistency(), cert.describe())
    except _Broken as exc:
        report.fail("statement", [str(exc)])
        _print(report)
        return 1
    if args.model:
        _check_model(cert, args.model, report)
    if args.inputs:
        _check_inputs(cert, args.inputs, report)
    stored = None
    if args.dataset:
        stored = _check_dataset(cert, args.dataset, report)
    _check_arithmetic(cert, report)
    _check_noise(cert, report)
    if args.recompute:
        _print(report)  # what held so far, before a long run
        report.lines.clear()
        x = stored if stored is not None else _given_inputs(args.inputs)
        _recompute(cert, args, x, report)
    _print(report)
    return 1 if report.failed else 0


def _print(report: Report) -> None:
    for line in report.lines:
        print(line, file=sys.stderr)


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {what} is not JSON ({exc})") from None


# --------------------------------------------------------------------------------------- signature


def _public_keys(pem_files: Sequence[str], keys_json: str | None) -> tuple[dict, dict[str, str]]:
    """Key id -> public key from the PEM files and the keys.json; and key id -> when it was
    retired, for the retired ones. ValueError for a file that is not what it should be."""
    from smoothcert.service.core.signing import key_id, load_public_pem

    keys, retired = {}, {}
    for path in pem_files:
        try:
            public = load_public_pem(Path(path).read_bytes())
        except FileNotFoundError:
            raise ValueError(f"no such file: {path}") from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--key {path}: not an Ed25519 public key in PEM ({exc})") from None
        keys[key_id(public)] = public
    if keys_json:
        listing = _read_json(keys_json, "the keys")
        entries = listing.get("keys") if isinstance(listing, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"--keys {keys_json}: not the answer of GET /v1/signing-keys")
        for entry in entries:
            try:
                public = load_public_pem(entry["public_key_pem"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"--keys {keys_json}: a key that is not Ed25519 ({exc})") from None
            keyid = key_id(public)
            if entry.get("keyid") not in (None, keyid):
                raise ValueError(
                    f"--keys {keys_json}: key {entry.get('keyid')} has the public key of {keyid}"
                )
            keys[keyid] = public
            if entry.get("retired_time"):
                retired[keyid] = str(entry["retired_time"])
    if not keys:
        raise ValueError(f"--keys {keys_json}: lists no key")
    return keys, retired


def _signature(
    envelope: Mapping[str, Any], keys: dict, retired: Mapping[str, str], report: Report
) -> dict[str, Any] | None:
    """The signed statement, with the signature's line in ``report``; None when it does not
    verify (then nothing else is checked: an unsigned statement proves nothing)."""
    from smoothcert.service.core.certificates import EnvelopeError, open_envelope

    try:
        document, keyid = open_envelope(envelope, keys)
    except EnvelopeError as exc:
        report.fail("signature", [str(exc)])
        return None
    when = f", retired {retired[keyid]}" if keyid in retired else ""
    report.ok("signature", f"key {keyid[:12]}{when}")
    if not isinstance(document, dict):
        report.fail("statement", ["the signed payload is not a JSON object"])
        return None
    return document


def _unsigned(envelope: Mapping[str, Any], keys_given: bool, report: Report) -> dict | None:
    """The statement of an envelope without signatures (a local certificate written without
    ``--signing-key``): a failure when keys were given to check it with, else a warning line;
    the other checks still run (they prove its content, not who made it)."""
    from smoothcert.service.core.certificates import PAYLOAD_TYPE

    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise ValueError(f"not a DSSE envelope: payloadType is {envelope.get('payloadType')!r}")
    try:
        document = json.loads(base64.b64decode(envelope["payload"], validate=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a DSSE envelope: its payload is not base64 JSON ({exc})") from None
    if keys_given:
        report.fail("signature", ["the envelope is not signed"])
    else:
        report.lines.append(
            "signature: none (an unsigned envelope: the checks below hold for its content, and "
            "say nothing of who made it)"
        )
    if not isinstance(document, dict):
        report.fail("statement", ["the payload is not a JSON object"])
        return None
    return document


# --------------------------------------------------------------------------------------- statement


@dataclass
class _Cert:
    """The parts of a statement the checks read."""

    statement: dict[str, Any]
    predicate: dict[str, Any]
    params: dict[str, Any]
    rows: list[dict[str, Any]]
    subjects: dict[str, str]  # subject name -> sha256
    model_subject: tuple[str, str]  # (name, sha256)

    @classmethod
    def read(cls, statement: dict[str, Any]) -> _Cert:
        from smoothcert.service.core.certificates import PREDICATE_TYPE, STATEMENT_TYPE

        if statement.get("_type") != STATEMENT_TYPE:
            raise _Broken(f"_type is {statement.get('_type')!r}, not {STATEMENT_TYPE!r}")
        if statement.get("predicateType") != PREDICATE_TYPE:
            raise _Broken(f"predicateType is {statement.get('predicateType')!r}")
        predicate = statement.get("predicate")
        subject = statement.get("subject")
        if not isinstance(predicate, dict) or not isinstance(subject, list) or not subject:
            raise _Broken("no predicate or no subject")
        params, rows = predicate.get("parameters"), predicate.get("rows")
        if not isinstance(params, dict) or not isinstance(rows, list):
            raise _Broken("the predicate has no parameters or no rows")
        if not all(isinstance(r, dict) for r in rows):
            raise _Broken("a row is not a JSON object")
        for key in ("sigma", "alpha", "n"):
            if not _number(params.get(key)):
                raise _Broken(f"the parameters have no number {key}")
        subjects: dict[str, str] = {}
        for s in subject:
            try:
                name, sha = str(s["name"]), str(s["digest"]["sha256"])
            except (KeyError, TypeError):
                raise _Broken("a subject without a name and a sha256 digest") from None
            if name in subjects:
                raise _Broken(f"subject {name} is named twice")
            subjects[name] = sha
        first = subject[0]
        if not str(first.get("name", "")).startswith("model:"):
            raise _Broken("the first subject is not the model")
        return cls(
            statement,
            predicate,
            params,
            rows,
            subjects,
            (str(first["name"]), str(first["digest"]["sha256"])),
        )

    @property
    def mode(self) -> str:
        if self.params.get("target_radius") is not None:
            return "target_radius"
        return str(self.params.get("mode", "certify"))

    @property
    def model(self) -> dict[str, Any]:
        model = self.predicate.get("model")
        return model if isinstance(model, dict) else {}

    @property
    def dataset(self) -> dict[str, Any] | None:
        dataset = self.predicate.get("dataset")
        return dataset if isinstance(dataset, dict) else None

    @property
    def provenance(self) -> dict[str, Any]:
        prov = self.predicate.get("provenance")
        return prov if isinstance(prov, dict) else {}

    def row_digests(self) -> list[str | None]:
        return [self.subjects.get(f"input:{row.get('index')}") for row in self.rows]

    def describe(self) -> str:
        job = self.predicate.get("job") or {}
        what = {"certify": "CERTIFY", "predict": "PREDICT", "target_radius": "target radius"}
        return (
            f"job {job.get('id')}, {what.get(self.mode, self.mode)} of {len(self.rows)} rows "
            f"with model {self.model.get('id')}, issued {self.predicate.get('issued_time')}"
        )

    def consistency(self) -> list[str]:
        """What in the statement disagrees with the rest of it."""
        problems = []
        name, sha = self.model_subject
        if self.model.get("sha256") != sha:
            problems.append(f"the model subject's digest {sha[:12]} is not the predicate's")
        if name != f"model:{self.model.get('id')}":
            problems.append(
                f"the model subject is {name}, the predicate's model {self.model.get('id')}"
            )
        ran = self.provenance.get("model_sha256")
        if ran is not None and ran != sha:
            problems.append(f"the worker ran a model with sha256 {str(ran)[:12]}, not {sha[:12]}")
        dataset = self.dataset
        if dataset is not None:
            named = self.subjects.get(f"dataset:{dataset.get('id')}")
            if named is None or named != dataset.get("arrays_sha256"):
                problems.append("the dataset subject is not the predicate's dataset")
        inputs = [n for n in self.subjects if n.startswith("input:")]
        if len(inputs) != len(self.rows):
            problems.append(f"{len(inputs)} input subjects for {len(self.rows)} rows")
        for row, digest in zip(self.rows, self.row_digests()):
            if digest is None:
                problems.append(f"row {row.get('index')}: no input subject")
            elif row.get("input_sha256") != digest:
                problems.append(f"row {row.get('index')}: its input_sha256 is not its subject's")
        if self.params.get("num_inputs") not in (None, len(self.rows)):
            problems.append(
                f"num_inputs is {self.params['num_inputs']}, with {len(self.rows)} rows"
            )
        seed = self.predicate.get("seed")
        if not isinstance(seed, dict) or seed.get("value") != self.params.get("seed"):
            problems.append("the predicate's seed is not the parameters' seed")
        shared: tuple[str, ...] = ("sigma", "alpha")
        shared += () if self.mode == "target_radius" else ("n",)
        shared += ("n0", "bound") if self.mode == "certify" else ()
        for key in shared:
            if key in self.provenance and self.provenance[key] != self.params.get(key):
                problems.append(
                    f"the parameters' {key} is {self.params.get(key)!r}, the worker ran "
                    f"{self.provenance[key]!r}"
                )
        return problems


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ------------------------------------------------------------------------------------ model, inputs


def _check_model(cert: _Cert, path: str, report: Report) -> None:
    from smoothcert.models.metadata import PIPELINE, sha256_file

    if cert.model.get("kind") == PIPELINE or cert.model.get("parts"):
        raise ValueError(
            f"--model: model {cert.model.get('id')} is a pipeline (denoiser + classifier); its "
            "digest is the pipeline's, over its two parts' digests, which one file cannot give: "
            "--model checks single models only"
        )
    try:
        sha = sha256_file(path)
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}") from None
    want = cert.model_subject[1]
    if sha == want:
        report.ok("model", f"{Path(path).name} has sha256 {sha[:12]}")
    else:
        report.fail("model", [f"{path} has sha256 {sha[:12]}, the certificate names {want[:12]}"])


def _given_inputs(paths: Sequence[str]) -> np.ndarray | list[dict[int, np.ndarray]]:
    """The inputs of ``--inputs``: a .npy as float32 (N, C, H, W) in [0, 1] as certified, or for
    images, per image its decodings by channel count (1: grey, 3: RGB)."""
    from smoothcert.service.core.images import to_unit
    from smoothcert.service.core.inputs import load_npy

    given = [Path(p) for p in paths]
    if len(given) == 1 and given[0].suffix == ".npy":
        x = load_npy(given[0])
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"--inputs {given[0]}: shape {x.shape}, not (N,C,H,W) or (C,H,W)")
        if x.dtype == np.uint8:
            return to_unit(x)
        if x.dtype.kind != "f":
            raise ValueError(f"--inputs {given[0]}: {x.dtype}, not floats in [0, 1] or uint8")
        return x
    return [_decodings(f) for f in _image_files(given)]


def _image_files(paths: Sequence[Path]) -> list[Path]:
    from smoothcert.service.core.inputs import image_files

    return image_files(paths)


def _decodings(path: Path) -> dict[int, np.ndarray]:
    """One image decoded as the service does, for a grey model and for an RGB model."""
    from smoothcert.service.core.images import read_header
    from smoothcert.service.core.inputs import decode_images

    header = read_header(path, str(path))
    shape = (header.height, header.width)
    return {c: decode_images([(str(path), path)], (c, *shape))[0] for c in (1, 3)}


def _check_inputs(cert: _Cert, paths: Sequence[str], report: Report) -> None:
    from smoothcert.service.core.certificates import input_digest

    given = _given_inputs(paths)
    if len(given) != len(cert.rows):
        report.fail(
            "inputs", [f"{len(given)} inputs given, the certificate has {len(cert.rows)} rows"]
        )
        return
    problems = []
    for row, digest, x in zip(cert.rows, cert.row_digests(), given):
        options = x.values() if isinstance(x, dict) else [x]
        found = [input_digest(a) for a in options]
        if digest not in found:
            problems.append(
                f"row {row.get('index')}: the input's sha256 is {found[0][:12]}, the certificate's "
                f"{str(digest)[:12]}"
            )
    report.check("inputs", problems, f"{len(given)} inputs match their rows' digests")


def _check_dataset(cert: _Cert, path: str, report: Report) -> np.ndarray | None:
    """Check the dataset's digest and the rows' digests; the rows' inputs as certified, in row
    order (for --recompute), or None when they are not all in the file."""
    from smoothcert.service.core.certificates import arrays_digest, input_digest
    from smoothcert.service.core.dataset_files import as_float_pixels

    dataset = cert.dataset
    if dataset is None:
        raise ValueError("--dataset: this certificate is not of a dataset job")
    x, y, raw = _read_dataset(path)
    want = str(dataset.get("arrays_sha256"))
    problems = []
    if want not in (arrays_digest({"x": x, "y": y}), arrays_digest(raw)):
        problems.append(
            f"{path}: its arrays' sha256 is {arrays_digest({'x': x, 'y': y})[:12]}, the "
            f"certificate's dataset {dataset.get('id')} has {want[:12]}"
        )
    rows = []
    for row, digest in zip(cert.rows, cert.row_digests()):
        i = row.get("index")
        if not isinstance(i, int) or not 0 <= i < len(x):
            problems.append(f"row {i}: not an index of the dataset's {len(x)} inputs")
            continue
        rows.append(as_float_pixels(x[i]))
        if input_digest(rows[-1]) != digest:
            problems.append(f"row {i}: x[{i}] does not have the row's sha256 {str(digest)[:12]}")
    report.check(
        "dataset",
        problems,
        f"{Path(path).name} is dataset {dataset.get('id')} (sha256 {want[:12]}); "
        f"{len(cert.rows)} rows match their inputs",
    )
    return np.stack(rows) if rows and len(rows) == len(cert.rows) else None


def _read_dataset(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """x and y as the service stores an upload of ``path`` (dataset_files: integer pixels and
    float32 as they are, wider floats as float32), and the arrays as the file holds them."""
    from smoothcert.service.core.dataset_files import open_dataset_npz

    if not Path(path).exists():
        raise ValueError(f"no such file: {path}")
    x_out, y_out = io.BytesIO(), io.BytesIO()
    with open_dataset_npz(path, MAX_DATASET_BYTES) as data:
        data.store(x_out, y_out)
    x_out.seek(0)
    y_out.seek(0)
    x, y = np.load(x_out, allow_pickle=False), np.load(y_out, allow_pickle=False)
    with np.load(path, allow_pickle=False) as npz:
        raw = {"x": npz["x"], "y": npz["y"]}
    return x, y, raw


# -------------------------------------------------------------------------------------- arithmetic


def _check_arithmetic(cert: _Cert, report: Report) -> None:
    try:
        from smoothcert.worker.smoothing import bounds  # numpy and scipy: no torch
    except ImportError as exc:  # a bare `pip install smoothcert`: no scipy
        raise ValueError(
            f"the arithmetic check needs {exc.name or 'scipy'}: pip install 'smoothcert[verify]'"
        ) from None

    p = cert.params
    sigma, alpha, n = float(p["sigma"]), float(p["alpha"]), p["n"]
    problems: list[str] = []
    note = ""
    if cert.mode == "predict":
        check_row: Callable[[dict[str, Any]], list[str]] = lambda row: _predict_row(
            row, n, alpha, bounds
        )
    elif cert.mode == "target_radius":
        check_row = lambda row: _radius_row(row, p, bounds)
        note = "; the sequential test's e-values are not recomputed"
    elif p.get("bound", "cohen") == "cohen":
        cap = bounds.radius_cap(n, alpha, sigma, "cohen")
        check_row = lambda row: _cohen_row(row, n, alpha, sigma, cap, bounds)
    elif p.get("bound") == "top2":
        classes, why = _top2_classes(cert, n, alpha, sigma, bounds)
        if classes is None:
            report.fail("arithmetic", [why])
            return
        note = f"; {classes} classes ({why})"
        check_row = lambda row: _top2_row(row, n, alpha, sigma, classes, bounds)
    else:
        report.fail("arithmetic", [f"unknown bound {p.get('bound')!r}"])
        return
    for row in cert.rows:
        problems += [f"row {row.get('index')}: {problem}" for problem in check_row(row)]
    problems += _chunk_problems(cert)
    summary = _summary_problems(cert)
    problems += summary
    what = {"certify": "CERTIFY", "predict": "PREDICT", "target_radius": "target-radius"}
    told = f"{len(cert.rows)} {what[cert.mode]} rows recomputed to {TOLERANCE:g}"
    if "summary" in cert.predicate:
        told += ", and the summary"
    report.check("arithmetic", problems, told + note)


def _check_noise(cert: _Cert, report: Report) -> None:
    """Discrete noise: K, the thresholds' sha256, the total variation and ``alpha_effective``
    recomputed from σ, α, n and the pixels per input, and the provenance's copy of them. A
    Gaussian certificate (or one from before noise was recorded) has nothing to recompute."""
    from smoothcert.service.core.certificates import NOISE_FIELDS

    noise = cert.predicate.get("noise")
    kind = cert.params.get("noise", "gaussian")
    if noise is None and kind == "gaussian":
        return
    if not isinstance(noise, dict) or noise.get("kind") != kind:
        report.fail("noise", [f"the predicate's noise is not the parameters' {kind!r}"])
        return
    if kind != "discrete":
        return
    try:
        from smoothcert.worker.smoothing import discrete  # mpmath and numpy: no torch
    except ImportError as exc:
        raise ValueError(
            f"the noise check needs {exc.name or 'mpmath'}: pip install 'smoothcert[verify]'"
        ) from None
    p = cert.params
    alpha, size, n = float(p["alpha"]), noise.get("input_size"), p["n"]
    try:
        table = discrete.thresholds(float(p["sigma"]))
    except ValueError as exc:
        report.fail("noise", [str(exc)])
        return
    problems = [
        f"noise.{key} is {noise.get(key)!r}, the provenance's {cert.provenance.get(key)!r}"
        for key in NOISE_FIELDS
        if cert.provenance.get(key) != noise.get(key)
    ]
    if noise.get("quantize") != bool(p.get("quantize", False)):
        problems.append("noise.quantize is not the parameters' quantize")
    expected = {
        "noise_k": table.k,
        "thresholds_sha256": table.sha256,
        "total_variation": table.total_variation,
    }
    problems += [
        f"noise.{key} is {noise.get(key)!r}, recomputed {value!r}"
        for key, value in expected.items()
        if noise.get(key) != value
    ]
    if not _count(size) or size < 1:
        problems.append(f"noise.input_size is {size!r}, not a pixel count")
    else:
        effective = discrete.alpha_effective(alpha, table.total_variation, size * int(n))
        recorded = noise.get("alpha_effective")
        if not isinstance(recorded, float) or abs(recorded - effective) > 1e-12 * effective:
            problems.append(f"noise.alpha_effective is {recorded!r}, recomputed {effective!r}")
    report.check(
        "noise",
        problems,
        f"discrete noise: K = {table.k}, thresholds sha256 {table.sha256[:12]}, alpha_effective "
        f"{noise.get('alpha_effective')!r} recomputed from sigma, alpha, n and {size} pixels",
    )


def _votes(row: Mapping[str, Any], n: int) -> tuple[dict[int, int], list[str]]:
    """The row's votes by class, and what is wrong with them."""
    votes = row.get("votes")
    if not isinstance(votes, dict):
        return {}, ["no votes"]
    out, problems = {}, []
    for key, count in votes.items():
        if not (str(key).isdigit() and _count(count)):
            problems.append(f"votes {key!r}: {count!r} is not a count of a class")
            continue
        out[int(key)] = int(count)
    if not problems and sum(out.values()) != n:
        problems.append(f"votes sum to {sum(out.values())}, not n = {n}")
    return out, problems


def _fields(row: Mapping[str, Any], counts: Sequence[str], numbers: Sequence[str]) -> list[str]:
    problems = [f"{k} is {row.get(k)!r}, not a count" for k in counts if not _count(row.get(k))]
    problems += [f"{k} is {row.get(k)!r}, not a number" for k in numbers if not _number(row.get(k))]
    prediction = row.get("prediction")
    if prediction is not None and not _count(prediction):
        problems.append(f"prediction is {prediction!r}, not a class")
    if row.get("abstained") is not (prediction is None):
        problems.append(f"abstained is {row.get('abstained')!r} with prediction {prediction!r}")
    return problems


def _counted(
    row: Mapping[str, Any], n: int, counts: Sequence[str], numbers: Sequence[str]
) -> tuple[dict[int, int], list[str]]:
    """A counted row's votes by class, and what is wrong with its fields, its n (the
    parameters' ``n``) or its votes, checked in that order."""
    problems = _fields(row, counts, numbers)
    if problems:
        return {}, problems
    if row["n"] != n:
        return {}, [f"n is {row['n']}, the parameters' n is {n}"]
    return _votes(row, n)


def _differ(name: str, recorded: Any, recomputed: float) -> list[str]:
    if abs(float(recorded) - float(recomputed)) <= TOLERANCE:
        return []
    return [f"{name} is {recorded!r}, recomputed {float(recomputed)!r}"]


def _cohen_row(
    row: dict[str, Any], n: int, alpha: float, sigma: float, cap: float, bounds
) -> list[str]:
    votes, problems = _counted(row, n, ("n_a", "n"), ("p_a_lower", "radius", "radius_cap"))
    if problems:
        return problems
    n_a, prediction = row["n_a"], row["prediction"]
    if prediction is not None and votes.get(prediction, 0) != n_a:
        problems.append(
            f"n_a is {n_a}, the prediction {prediction} has {votes.get(prediction, 0)} votes"
        )
    if prediction is None and n_a != 0 and n_a not in votes.values():
        problems.append(f"n_a is {n_a}, which no class has")
    p_a_lower, radius, abstained = (float(v) for v in bounds.cohen_radius(n_a, n, alpha, sigma))
    problems += _differ("p_a_lower", row["p_a_lower"], p_a_lower)
    problems += _differ("radius", row["radius"], radius)
    if bool(abstained) != (prediction is None):
        problems.append(
            f"p_a_lower {p_a_lower:.6g} {'<' if abstained else '>='} 1/2, yet the row "
            f"{'has a prediction' if prediction is not None else 'abstained'}"
        )
    problems += _differ("radius_cap", row["radius_cap"], cap)
    return problems


def _top2_classes(
    cert: _Cert, n: int, alpha: float, sigma: float, bounds
) -> tuple[int | None, str]:
    """The number of classes of a top2 certificate, and how it was found (or why not)."""
    for where in (cert.model, cert.provenance):
        if _count(where.get("num_classes")) and where["num_classes"] >= 1:
            return int(where["num_classes"]), "as recorded"
    caps = {r.get("radius_cap") for r in cert.rows}
    if len(caps) != 1 or not _number(next(iter(caps))):
        return None, "the rows' radius_cap differ or are missing"
    cap = float(next(iter(caps)))  # type: ignore[arg-type]
    least = 2
    for row in cert.rows:
        classes = [int(k) for k in (row.get("votes") or {}) if str(k).isdigit()]
        for c in (*classes, row.get("prediction"), row.get("label")):
            if _count(c):
                least = max(least, c + 1)

    def radius_cap(k: int) -> float:
        return bounds.radius_cap(n, alpha, sigma, "top2", k)

    low, high = least, MAX_CLASSES  # radius_cap falls as the classes grow: the least K that fits
    if radius_cap(low) < cap - TOLERANCE or radius_cap(high) > cap + TOLERANCE:
        return None, (
            f"radius_cap {cap!r} is the top2 cap of no class count from {least} to {MAX_CLASSES}"
        )
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if radius_cap(mid) <= cap + TOLERANCE else (mid + 1, high)
    if abs(radius_cap(low) - cap) > TOLERANCE:
        return None, f"radius_cap {cap!r} is the top2 cap of no class count"
    return low, "from radius_cap"


def _top2_row(
    row: dict[str, Any], n: int, alpha: float, sigma: float, classes: int, bounds
) -> list[str]:
    votes, problems = _counted(
        row, n, ("n_a", "n"), ("p_a_lower", "p_b_upper", "radius", "radius_cap")
    )
    if problems:
        return problems
    if any(c >= classes for c in votes):
        return [f"votes for class {max(votes)}, of {classes} classes"]
    counts = np.zeros((1, classes), dtype=np.int64)
    for c, k in votes.items():
        counts[0, c] = k
    n_a, prediction = row["n_a"], row["prediction"]
    if prediction is not None:
        if votes.get(prediction, 0) != n_a:
            return [
                f"n_a is {n_a}, the prediction {prediction} has {votes.get(prediction, 0)} votes"
            ]
        candidates = [prediction]
    else:  # the selected class is not recorded when the row abstains: any with n_a votes
        candidates = [c for c in range(classes) if counts[0, c] == n_a][: 1 if n_a == 0 else None]
        if not candidates:
            return [f"n_a is {n_a}, which no class has"]
    first: list[str] = []
    for c in candidates:
        p_a, p_b, radius, abstained = (
            float(v[0]) for v in bounds.top2_radius(counts, np.array([c]), alpha, sigma)
        )
        found = _differ("p_a_lower", row["p_a_lower"], p_a)
        found += _differ("p_b_upper", row["p_b_upper"], p_b)
        found += _differ("radius", row["radius"], radius)
        if bool(abstained) != (prediction is None):
            found.append(
                f"p_a_lower {p_a:.6g} {'<=' if abstained else '>'} p_b_upper {p_b:.6g}, yet the "
                f"row {'has a prediction' if prediction is not None else 'abstained'}"
            )
        if not found:
            break
        first = first or found
    else:
        problems += first
    problems += _differ(
        "radius_cap", row["radius_cap"], bounds.radius_cap(n, alpha, sigma, "top2", classes)
    )
    return problems


def _predict_row(row: dict[str, Any], n: int, alpha: float, bounds) -> list[str]:
    votes, problems = _counted(row, n, ("n_a", "n_b", "n"), ("p_value",))
    if problems:
        return problems
    top = sorted(votes.values(), reverse=True) + [0, 0]
    if (row["n_a"], row["n_b"]) != (top[0], top[1]):
        problems.append(
            f"n_a, n_b are {row['n_a']}, {row['n_b']}; the votes' top two {top[0]}, {top[1]}"
        )
    p_value = bounds.predict_p_value(top[0], top[1])
    problems += _differ("p_value", row["p_value"], p_value)
    prediction = row["prediction"]
    if (p_value > alpha) != (prediction is None):
        problems.append(
            f"the p-value {p_value:.6g} is {'above' if p_value > alpha else 'at most'} alpha "
            f"{alpha:g}, yet the row {'has a prediction' if prediction is not None else 'abstained'}"
        )
    if prediction is not None and votes.get(prediction, 0) != top[0]:
        problems.append(f"the prediction {prediction} is not the class with most votes")
    return problems


def _radius_row(row: dict[str, Any], params: Mapping[str, Any], bounds) -> list[str]:
    problems = _fields(row, ("n_a", "n", "samples_used"), ("p_a_lower", "radius", "target_radius"))
    if problems:
        return problems
    from scipy.stats import norm

    sigma, n_max, n0 = float(params["sigma"]), params["n"], params.get("n0", 0)
    n_a, n, p_a_lower = row["n_a"], row["n"], float(row["p_a_lower"])
    problems += _differ("target_radius", row["target_radius"], float(params["target_radius"]))
    if not n_a <= n <= n_max:
        problems.append(f"n_a = {n_a}, n = {n} with the cap n = {n_max}")
    if row["samples_used"] not in ((n0 + n) if n else 0, n0 + n):
        problems.append(f"samples_used is {row['samples_used']}, with n0 = {n0} and n = {n}")
    if not 0 <= p_a_lower <= (n_a / n if n else 0.0) + TOLERANCE:
        problems.append(f"p_a_lower {p_a_lower!r} is not in [0, n_a/n]")
    certain = p_a_lower > 0.5
    problems += _differ("radius", row["radius"], sigma * norm.ppf(p_a_lower) if certain else 0.0)
    if certain != (row["prediction"] is not None):
        problems.append(f"p_a_lower {p_a_lower:.6g} and prediction {row['prediction']!r} disagree")
    if row.get("certified_at_r") and row["prediction"] is None:
        problems.append("certified at r without a prediction")
    return problems


def _chunk_problems(cert: _Cert) -> list[str]:
    """A dataset job's chunks: consecutive, covering the rows, each with its seed."""
    from smoothcert.service.core.contract import chunk_seed

    chunks = cert.predicate.get("chunks")
    if not chunks:
        return []
    seed, problems, at = cert.params.get("seed"), [], None
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, dict) or chunk.get("index") != i:
            return [f"chunk {i}: not the chunk of index {i}"]
        if isinstance(seed, int) and chunk.get("seed") != chunk_seed(seed, i):
            problems.append(f"chunk {i}: seed {chunk.get('seed')}, not chunk_seed({seed}, {i})")
        if at is not None and chunk.get("first") != at:
            problems.append(f"chunk {i}: starts at {chunk.get('first')}, the last ended at {at}")
        at = (chunk.get("first") or 0) + (chunk.get("count") or 0)
    if sum(c.get("count") or 0 for c in chunks) != len(cert.rows):
        problems.append(
            f"the chunks hold {sum(c.get('count') or 0 for c in chunks)} rows, not {len(cert.rows)}"
        )
    return problems


def _summary_problems(cert: _Cert) -> list[str]:
    from smoothcert.service.core.accuracy import average_certified_radius, certified_accuracy

    summary = cert.predicate.get("summary")
    if not summary:
        return []
    if not isinstance(summary, dict):
        return ["summary: not a JSON object"]
    rows = [r for r in cert.rows if r.get("label") is not None]
    problems = []
    if summary.get("labelled") != len(rows):
        problems.append(
            f"summary: labelled is {summary.get('labelled')!r}, {len(rows)} rows have labels"
        )
    if not rows:
        return problems
    right = [r.get("prediction") is not None and r["prediction"] == r["label"] for r in rows]
    problems += _differ(
        "summary: accuracy", summary.get("accuracy", math.nan), float(np.mean(right))
    )
    if cert.mode == "predict" or "radius" not in rows[0]:
        return problems
    radii = [float(r.get("radius", 0.0)) for r in rows]
    for point in summary.get("certified_accuracy") or []:
        r = float(point.get("radius", math.nan))
        share = float(certified_accuracy(right, radii, [r])[0])
        problems += _differ(
            f"summary: certified accuracy at {r:g}", point.get("accuracy", math.nan), share
        )
    if "acr" in summary:
        acr = average_certified_radius(right, radii)
        problems += _differ("summary: acr", summary["acr"], acr)
    return problems


# --------------------------------------------------------------------------------------- recompute


def _recompute(cert: _Cert, args: argparse.Namespace, x: Any, report: Report) -> None:
    """Rerun the job here: first with its own seed (a dataset job: each chunk with its chunk's
    seed and batch size), then with a fresh one.

    Same seed: the rows that match the certificate's exactly (prediction, counts, bounds,
    radius) are counted. The same seed, batch size, runtime, precision and device give
    bit-identical counts; another device or runtime may round a score differently and flip a vote,
    so a difference fails the check only when the rerun ran as the job did (device, runtime,
    provider, precision and batch size all the recorded ones).

    Fresh seed (CERTIFY rows that did not abstain): the rerun draws n new estimation copies per
    input and counts k votes for the certificate's class. The row fails when the one-sided upper
    Clopper-Pearson bound of k in n at level gamma / m lies below the certificate's p_A_lower (m:
    the rows tested; gamma: ``--recompute-alpha``, else the certificate's alpha). Rule's failure
    probability: when every tested row's bound holds (p_A >= p_A_lower), each upper bound falls
    below p_A with probability at most gamma / m, so a sound certificate fails this check with
    probability at most gamma in all (union bound). PREDICT and target-radius rows get the
    same-seed comparison only.
    """
    if cert.model.get("parts"):
        raise ValueError("--recompute: a pipeline's certificate cannot be rerun from one --model")
    if isinstance(x, list):
        raise ValueError("--recompute needs the inputs as an .npy or --dataset, not image files")
    if len(x) != len(cert.rows):
        raise ValueError(f"--recompute: {len(x)} inputs for {len(cert.rows)} rows")
    from smoothcert.service.core.contract import CertifyJob

    try:
        job = CertifyJob.from_record_params(cert.params)
    except ValueError as exc:
        raise ValueError(
            f"--recompute: the certificate's parameters are not a job's ({exc})"
        ) from None
    params = job.params
    model = _load_model(args.model, args.device, params, _batch_sizes(cert)[0] or 256)

    same, same_rows = 0, []
    ran: dict[str, Any] = {}
    for (start, stop), seed, batch in _runs(cert, job):
        rows, ran = _engine(model, x[start:stop], params, seed, batch)
        same_rows += rows
    for mine, theirs in zip(same_rows, cert.rows):
        same += _same_row(mine, theirs)
    recorded = {k: cert.provenance.get(k) for k in ("device", "runtime", "provider", "precision")}
    as_recorded = all(ran.get(k) == v for k, v in recorded.items()) and set(_batch_sizes(cert)) == {
        ran.get("batch_size")
    }
    told = (
        f"{same} of {len(cert.rows)} rows identical with seed {params.seed} on "
        f"{ran.get('device')}/{ran.get('runtime')}/{ran.get('precision')}"
    )
    if same == len(cert.rows) or not as_recorded:
        report.ok(
            "recompute (same seed)",
            told
            if as_recorded or same == len(cert.rows)
            else told + f"; the job ran on "
            f"{recorded['device']}/{recorded['runtime']}/{recorded['precision']}, so votes may differ",
        )
    else:
        report.fail("recompute (same seed)", [told + ", which is how the job ran"])

    if not params.certifies:
        return
    fresh = args.recompute_seed if args.recompute_seed is not None else secrets.randbits(62)
    gamma = args.recompute_alpha if args.recompute_alpha is not None else params.alpha
    if not 0 < gamma < 1:
        raise ValueError(f"--recompute-alpha must be in (0, 1), got {gamma}")
    batch = _batch_sizes(cert)[0]
    rows, _ = _engine(model, x, params, fresh, batch)
    report.check(
        "recompute (fresh seed)",
        _fresh_problems(cert.rows, rows, gamma),
        f"seed {fresh}: every certified row's p_a_lower is within the fresh counts' upper bound "
        f"(level {gamma:g} over all rows)",
    )


def _fresh_problems(
    certified: Sequence[Mapping[str, Any]], fresh: Sequence[Mapping[str, Any]], gamma: float
) -> list[str]:
    """The rows whose certified p_A_lower exceeds the fresh counts' upper bound at gamma / m."""
    from smoothcert.worker.smoothing import bounds

    tested = [(c, f) for c, f in zip(certified, fresh) if c.get("prediction") is not None]
    problems = []
    for c, f in tested:
        k = int((f.get("votes") or {}).get(str(c["prediction"]), 0))
        upper = float(bounds.upper_confidence_bound(k, f["n"], gamma / len(tested)))
        if upper < float(c["p_a_lower"]):
            problems.append(
                f"row {c.get('index')}: class {c['prediction']} got {k} of {f['n']} fresh votes; "
                f"their upper bound {upper:.6g} is below the certificate's p_a_lower "
                f"{float(c['p_a_lower']):.6g}"
            )
    return problems


def _batch_sizes(cert: _Cert) -> list[int | None]:
    """The batch sizes the job ran with: one, or one per chunk."""
    chunks = cert.provenance.get("chunks")
    if isinstance(chunks, list) and chunks:
        return [c.get("batch_size") if isinstance(c, dict) else None for c in chunks]
    size = cert.provenance.get("batch_size")
    return [size if isinstance(size, int) else cert.params.get("batch_size")]


def _runs(cert: _Cert, job) -> Iterator[tuple[tuple[int, int], int, int | None]]:
    """(rows [start, stop) in the certificate's order, seed, batch size) of each engine call the
    job made: one, or one per chunk of a dataset job."""
    chunks = cert.predicate.get("chunks")
    sizes = _batch_sizes(cert)
    if not chunks:
        yield (0, len(cert.rows)), job.seed, sizes[0]
        return
    at = 0
    for chunk, size in zip(chunks, sizes + [None] * len(chunks)):
        yield (at, at + int(chunk["count"])), int(chunk["seed"]), size
        at += int(chunk["count"])


def _load_model(path: str, device: str, params, batch: int):
    """The model file in the job's runtime and precision (torch from here on)."""
    from smoothcert.models.runtimes import select_runtime
    from smoothcert.service.cli.main import cache_dir, load_classifier_arg

    model = load_classifier_arg(path, device)
    return select_runtime(
        model, params.runtime, batch_size=batch, cache_dir=cache_dir(), precision=params.precision
    )


def _engine(model, x: np.ndarray, params, seed: int, batch: int | None) -> tuple[list, dict]:
    """One engine call as the job made it: rows (dicts) and provenance."""
    from smoothcert.worker.smoothing import RunOptions, run_params

    run = run_params(model, x, params, RunOptions(batch_size=batch, seed=seed))
    out = run.to_dict()
    return out["results"], out["provenance"]


def _same_row(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> bool:
    keys = (
        *("prediction", "n_a", "n", "votes", "p_a_lower", "radius", "p_value", "n_b"),
        *("certified_at_r", "samples_used", "p_b_upper"),
    )
    return all(mine.get(k) == theirs.get(k) for k in keys if k in mine or k in theirs)
