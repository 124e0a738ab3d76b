"""Certificates: an in-toto Statement v1 about a succeeded job, signed in a DSSE envelope, stored on
the data volume under its own SHA-256 (torch-free and scipy-free; docs/certificate.md is the
format's reference, and ``smoothcert verify`` checks one offline).

The statement's ``subject`` names what was certified by digest: the model (``model:<id>``: its
file's SHA-256, a pipeline's :func:`~smoothcert.models.metadata.pipeline_sha256`), each input
(``input:<row index>``: :func:`input_digest` of the array as certified) and, for a dataset job,
the dataset (``dataset:<id>``: :func:`arrays_digest` of its arrays as stored). The predicate
(:data:`PREDICATE_TYPE`) holds the guarantee in words, the parameters and seed, where the seed
came from, each row, the summary for labelled rows, the worker's provenance and who asked.

DSSE (https://github.com/secure-systems-lab/dsse): the signature is Ed25519 over
``PAE(payloadType, payload)`` = ``b"DSSEv1 %d %s %d %s" % (len(type), type, len(body), body)``;
the envelope is ``{"payload": b64(body), "payloadType": ..., "signatures": [{"keyid", "sig"}]}``.

Storage under ``DATA_DIR/certificates``::

    <sha256>.json          the envelope, exactly the bytes whose SHA-256 names it
    by-job/<job id>        the SHA-256 of the job's certificate (the first one written wins)

A certificate is kept ``SMOOTHCERT_CERTIFICATE_RETENTION_DAYS`` from when it was issued (its
mtime; :meth:`CertificateStore.sweep`, run by the API's issuer thread) or until its owner deletes
it, and counts against its account's storage quota meanwhile
(:func:`~smoothcert.service.core.storage_quota.hold_certificate`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from smoothcert.service.core.accuracy import DEFAULT_CURVE_RADII, certified_accuracy
from smoothcert.service.core.store import block_size, disk_bytes

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://smoothcert.dev/certificate/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
ROW_FIELDS_LEFT_OUT = ("elapsed_s",)  # how long a row took is no part of what was proved
_SHA256 = frozenset("0123456789abcdef")


def input_digest(x: np.ndarray) -> str:
    """The SHA-256 of one input as certified: the C-contiguous little-endian float32 bytes of its
    (C, H, W) array after decoding and scaling to [0, 1]."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype="<f4").tobytes()).hexdigest()


def input_digests(x: np.ndarray) -> list[str]:
    """:func:`input_digest` of each input of a batch (N, C, H, W)."""
    return [input_digest(row) for row in x]


def arrays_digest(arrays: Mapping[str, np.ndarray], block_bytes: int = 16 << 20) -> str:
    """A dataset's SHA-256 over its arrays as stored (not over an ``.npz``'s bytes, which change
    when the same arrays are zipped again): for each name in sorted order,
    ``"<name>:<dtype.str>:<shape, comma-separated>\\n"`` in ASCII, then the array's C-order bytes
    (little-endian). Reads memory-mapped arrays a block of rows at a time."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        h.update(f"{name}:{dtype.str}:{','.join(str(d) for d in a.shape)}\n".encode())
        row_bytes = max(1, a[:1].nbytes) if a.ndim else a.nbytes
        step = max(1, block_bytes // row_bytes)
        for i in range(0, max(1, len(a)) if a.ndim else 1, step):
            part = a[i : i + step] if a.ndim else a
            h.update(np.ascontiguousarray(part, dtype=dtype).tobytes())
    return h.hexdigest()


def npy_files_digest(files: Mapping[str, Path], block_bytes: int = 1 << 20) -> str:
    """:func:`arrays_digest` of ``.npy`` files (name -> path), read in blocks of ``block_bytes``
    rather than mapped, so that what a process holds does not grow with the files (a mapped
    file's pages count against its memory as they are read)."""
    h = hashlib.sha256()
    for name in sorted(files):
        with open(files[name], "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            if fortran or dtype.byteorder == ">" or dtype.hasobject:
                return arrays_digest(
                    {k: np.load(v, mmap_mode="r", allow_pickle=False) for k, v in files.items()}
                )
            h.update(f"{name}:{dtype.str}:{','.join(str(d) for d in shape)}\n".encode())
            while block := f.read(block_bytes):
                h.update(block)
    return h.hexdigest()


def utc_text(seconds: float) -> str:
    """Unix seconds as RFC 3339 UTC with milliseconds, as job records write times (without
    importing the job store, which needs Redis: the CLI writes certificates too)."""
    moment = datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")
    return moment.replace("+00:00", "Z")


def is_sha256(text: str) -> bool:
    return len(text) == 64 and set(text) <= _SHA256


NOISE_FIELDS = ("noise_k", "thresholds_sha256", "total_variation", "input_size", "alpha_effective")
"""The provenance's fields of discrete noise that a certificate's ``noise`` repeats."""


def noise_block(params: Mapping[str, Any], provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The predicate's ``noise``: ``{"kind": "gaussian"}``, or for discrete noise its kind, K,
    the thresholds' sha256, the total variation per coordinate, the pixels per input, the
    failure probability it adds up to (``alpha_effective``) and whether inputs were rounded."""
    kind = str(params.get("noise") or provenance.get("noise") or "gaussian")
    if kind != "discrete":
        return {"kind": kind}
    return {
        "kind": kind,
        **{k: provenance.get(k) for k in NOISE_FIELDS},
        "quantize": bool(params.get("quantize", False)),
    }


def guarantee(
    mode: str,
    bound: str | None,
    alpha: float,
    sigma: float,
    noise: Mapping[str, Any] | None = None,
) -> str:
    """What the certificate promises, in words (``noise``: :func:`noise_block`; None: Gaussian)."""
    classifier = (
        f"the smoothed classifier g(x) = argmax_c P(f(x + d) = c), d ~ N(0, {sigma:g}^2 I), "
        "where f is the model named in the subject, on inputs scaled to [0, 1] as the subject's "
        "digests describe"
    )
    if noise is not None and noise.get("kind") == "discrete":
        k = int(noise.get("noise_k") or 1)
        classifier = (
            f"the smoothed classifier g(x) = argmax_c P(F(x + d) = c), d ~ N(0, {sigma:g}^2 I), "
            f"where F(z) = f(clip(round(255 z), {-255 * k}, {255 * (k + 1)}) / 255) and f is the "
            "model named in the subject, on inputs of the 8-bit grid (x = k/255) as the subject's "
            "digests describe; F(x + d) was evaluated exactly, as f of an integer vector over 255 "
            "with the discretised Gaussian drawn from integer thresholds "
            "(noise.thresholds_sha256), so floating-point rounding cannot void the promise"
        )
        alpha_text = (
            f"{float(noise.get('alpha_effective') or alpha):.10g} (alpha_effective: alpha = "
            f"{alpha:g} plus the sampler's total distance from the exact law)"
        )
        if noise.get("quantize"):
            classifier += (
                "; the inputs were rounded onto the 8-bit grid before certification "
                "(quantize): this promise is about the rounded images, round(255 x) / 255 of the "
                "digested inputs (for inputs sent with the job, the digests are already the "
                "rounded images)"
            )
    else:
        alpha_text = f"{alpha:g}"
    if mode == "predict":
        return (
            f"For each row with a prediction: with probability at least 1 - {alpha_text} over the "
            f"sampling, the prediction is the class that {classifier} returns for that input. A "
            "row without a prediction (abstained) promises nothing."
        )
    if mode == "target_radius":
        return (
            f"For each row certified at the target radius r: with probability at least "
            f"1 - {alpha_text} over the sampling (an anytime-valid test), {classifier} returns the "
            "row's prediction at every point within l2 distance r of the input. Other rows "
            "promise nothing."
        )
    how = (
        "Cohen et al.'s one-sided Clopper-Pearson bound on p_A"
        if bound in (None, "cohen")
        else "the two-class bound on p_A and p_B (a union bound over the classes)"
    )
    return (
        f"For each row with a prediction: with probability at least 1 - {alpha_text} over the "
        f"sampling ({how}), {classifier} returns the row's prediction at every point within l2 "
        "distance `radius` of the input. A row that abstained (radius 0) promises nothing. The "
        "promise is about g, not about f alone, and holds only for inputs given exactly as "
        "digested (the same scaling to [0, 1])."
    )


def statement(
    *,
    job: Mapping[str, Any],
    model: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    digests: Sequence[str],
    dataset: Mapping[str, Any] | None,
    chunks: Sequence[Mapping[str, Any]] | None,
    issued_time: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The in-toto statement of one succeeded job.

    ``job``: id, kind, owner, params (the record's), seed_source ("client" or "service"),
    provenance, summary (certified accuracy and ACR, when labels were given); ``model``: the model
    record (id, name, sha256, kind, parts); ``digests``: one :func:`input_digest` per row, in row
    order; ``dataset``: id, name, arrays_sha256 (a dataset job); ``chunks``: index, skip, count,
    seed of each chunk (a dataset job)."""
    if len(digests) != len(rows):
        raise ValueError(f"{len(digests)} input digests for {len(rows)} rows")
    params = dict(job["params"])
    subject = [{"name": f"model:{model['id']}", "digest": {"sha256": model["sha256"]}}]
    if dataset is not None:
        subject.append(
            {"name": f"dataset:{dataset['id']}", "digest": {"sha256": dataset["arrays_sha256"]}}
        )
    subject += [
        {"name": f"input:{row['index']}", "digest": {"sha256": digest}}
        for row, digest in zip(rows, digests, strict=True)
    ]
    mode = str(params.get("mode", "certify"))
    noise = noise_block(params, job.get("provenance") or {})
    predicate: dict[str, Any] = {
        "guarantee": guarantee(
            mode, params.get("bound"), float(params["alpha"]), float(params["sigma"]), noise
        ),
        "noise": noise,
        "job": {"id": job["id"], "kind": job["kind"], "finished_time": job.get("finished_time")},
        "requested_by": {"account": job.get("owner")},
        "issued_time": issued_time,
        "model": {
            k: model.get(k)
            for k in ("id", "name", "sha256", "kind", "format", "arch", "num_classes", "parts")
            if model.get(k) is not None
        },
        "parameters": params,
        "seed": {"value": params.get("seed"), "source": job["seed_source"]},
        "rows": [
            {
                **{k: v for k, v in row.items() if k not in ROW_FIELDS_LEFT_OUT},
                "input_sha256": digest,
            }
            for row, digest in zip(rows, digests, strict=True)
        ],
        "provenance": job.get("provenance") or {},
    }
    if dataset is not None:
        predicate["dataset"] = dict(dataset)
    if chunks:
        predicate["chunks"] = [dict(c) for c in chunks]
    if job.get("summary"):
        predicate["summary"] = dict(job["summary"])
    if extra:
        predicate.update(extra)
    return {
        "_type": STATEMENT_TYPE,
        "subject": subject,
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }


def summary(rows: Sequence[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """Accuracy, and for certify rows the certified accuracy at the standard radii and the average
    certified radius (ACR: the mean over the rows of the radius where the prediction is the label,
    0 elsewhere); None without labels."""
    if not rows or rows[0].get("label") is None:
        return None
    right = [r.get("prediction") is not None and r["prediction"] == r["label"] for r in rows]
    out: dict[str, Any] = {"labelled": len(rows), "accuracy": float(np.mean(right))}
    if mode == "certify" and "radius" in rows[0]:
        radii = [float(r["radius"]) for r in rows]
        shares = certified_accuracy(right, radii, DEFAULT_CURVE_RADII)
        out["certified_accuracy"] = [
            {"radius": float(r), "accuracy": float(a)} for r, a in zip(DEFAULT_CURVE_RADII, shares)
        ]
        from smoothcert.service.core.accuracy import average_certified_radius

        out["acr"] = average_certified_radius(right, radii)
    return out


def canonical_json(value: Any) -> bytes:
    """The payload's bytes: JSON with sorted keys, no spaces, UTF-8 (any JSON would do for DSSE;
    a fixed form makes equal statements equal bytes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE's pre-authentication encoding of ``body``."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def sign(document: Mapping[str, Any], key: Ed25519PrivateKey, keyid: str) -> dict[str, Any]:
    """The DSSE envelope of ``document`` signed with ``key``."""
    body = canonical_json(document)
    signature = key.sign(pae(PAYLOAD_TYPE, body))
    return {
        "payload": base64.b64encode(body).decode(),
        "payloadType": PAYLOAD_TYPE,
        "signatures": [{"keyid": keyid, "sig": base64.b64encode(signature).decode()}],
    }


class EnvelopeError(ValueError):
    """An envelope that is not one, or whose signature does not hold; the message says which."""


def open_envelope(
    envelope: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]
) -> tuple[dict[str, Any], str]:
    """The statement of ``envelope`` and the id of the key whose signature holds; EnvelopeError
    unless one signature verifies with the key of its ``keyid`` in ``keys`` (key id -> key;
    a signature without a key id is tried against every key)."""
    try:
        body = base64.b64decode(envelope["payload"], validate=True)
        payload_type = envelope["payloadType"]
        signatures = list(envelope["signatures"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EnvelopeError(f"not a DSSE envelope: {exc}") from None
    if payload_type != PAYLOAD_TYPE:
        raise EnvelopeError(f"payloadType is {payload_type!r}, not {PAYLOAD_TYPE!r}")
    message = pae(payload_type, body)
    unknown = []
    for sig in signatures:
        keyid = str(sig.get("keyid") or "") if isinstance(sig, Mapping) else ""
        candidates = [keys[keyid]] if keyid in keys else ([] if keyid else list(keys.values()))
        if not candidates:
            unknown.append(str(keyid))
        for public in candidates:
            with contextlib.suppress(InvalidSignature, ValueError, TypeError):
                public.verify(base64.b64decode(sig["sig"], validate=True), message)
                try:
                    document = json.loads(body)
                except ValueError as exc:
                    raise EnvelopeError(f"the signed payload is not JSON: {exc}") from None
                found = keyid or next(k for k, v in keys.items() if v is public)
                return document, found
    if unknown and len(unknown) == len(signatures):
        raise EnvelopeError(
            f"signed with key {', '.join(unknown)}, which is not among the keys given"
        )
    raise EnvelopeError("the signature does not match the payload (changed after signing?)")


def envelope_bytes(envelope: Mapping[str, Any]) -> bytes:
    """The envelope as stored and served: indented JSON, so a person can read it."""
    return json.dumps(envelope, indent=2).encode() + b"\n"


class CertificateStore:
    """Signed certificates under ``root`` (``DATA_DIR/certificates``), named by their SHA-256."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise KeyError(sha256)
        return self.root / f"{sha256}.json"

    def read(self, sha256: str) -> bytes | None:
        try:
            return self.path(sha256).read_bytes()
        except (KeyError, OSError):
            return None

    def of_job(self, job_id: str) -> str | None:
        """The SHA-256 of ``job_id``'s certificate, or None when it has none (yet, or any more:
        deleted, or past its retention)."""
        try:
            text = (self.root / "by-job" / job_id).read_text().strip()
        except OSError:
            return None
        return text if is_sha256(text) and self.path(text).exists() else None

    def disk_bytes(self, sha256: str) -> int:
        """What certificate ``sha256`` takes on disk, its ``by-job`` entry included, in whole
        blocks (as datasets and job inputs are counted); 0 when it is not stored."""
        try:
            size = self.path(sha256).stat().st_size
        except (KeyError, OSError):
            return 0
        return disk_bytes([size], block_size(self.root))  # the file, and its by-job entry

    def remove(self, sha256: str) -> bool:
        """Delete certificate ``sha256`` (its job's ``by-job`` entry then names nothing, and is
        dropped by :meth:`sweep`); False when it was not stored."""
        try:
            self.path(sha256).unlink()
        except (KeyError, OSError):
            return False
        return True

    def sweep(self, max_age_s: float, now: float | None = None) -> int:
        """Delete the certificates written more than ``max_age_s`` ago (the file's mtime: when it
        was issued) and the ``by-job`` entries that name no stored certificate; how many
        certificates went."""
        now = time.time() if now is None else now
        removed = 0
        for sha in list(self.all()):
            with contextlib.suppress(OSError):
                if now - self.path(sha).stat().st_mtime > max_age_s:
                    self.path(sha).unlink()
                    removed += 1
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.root / "by-job"):
                with contextlib.suppress(OSError):
                    text = Path(entry.path).read_text().strip()
                    if not (is_sha256(text) and self.path(text).exists()):
                        os.unlink(entry.path)
        return removed

    def put(self, job_id: str, data: bytes) -> str:
        """Store ``data`` (an envelope's bytes) as ``job_id``'s certificate unless the job has one
        already; the SHA-256 of the job's certificate either way (first writer wins)."""
        sha = hashlib.sha256(data).hexdigest()
        by_job = self.root / "by-job"
        by_job.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_once(self.root / f"{sha}.json", data)
        if self.of_job(job_id) is None:  # an entry naming a deleted certificate names nothing
            with contextlib.suppress(OSError):
                (by_job / job_id).unlink()
        _write_once(by_job / job_id, sha.encode())
        winner = self.of_job(job_id)
        if winner is not None and winner != sha:
            with contextlib.suppress(OSError):
                (self.root / f"{sha}.json").unlink()  # another process certified it first
        return winner or sha

    def all(self) -> Iterable[str]:
        """The SHA-256 of every stored certificate."""
        for path in self.root.glob("*.json"):
            if is_sha256(path.stem):
                yield path.stem


def _write_once(path: Path, data: bytes) -> None:
    """Write ``data`` at ``path`` atomically unless something is there already."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cert-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
