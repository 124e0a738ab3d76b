"""Signed test certificates: rows computed with the engine's statistics from made-up counts (so
their arithmetic is exact), a statement built with the service's own code, signed with a
throwaway Ed25519 key. Torch-free."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from smoothcert.service.core import certificates
from smoothcert.service.core.accuracy import DEFAULT_CURVE_RADII, certified_accuracy
from smoothcert.service.core.signing import key_id, public_pem
from smoothcert.worker.smoothing import bounds

MODEL_SHA256 = "ab" * 32


class Signer:
    """A throwaway signing key: its id, its public PEM, and what it signs."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.keyid = key_id(self.key.public_key())
        self.pem = public_pem(self.key.public_key())

    def sign(self, statement: Mapping[str, Any]) -> dict[str, Any]:
        return certificates.sign(statement, self.key, self.keyid)

    def write_pem(self, path: Path) -> Path:
        path.write_text(self.pem)
        return path

    def listing(self, retired_time: str | None = None) -> dict[str, Any]:
        """This key as ``GET /v1/signing-keys`` lists it."""
        return {
            "keyid": self.keyid,
            "algorithm": "ed25519",
            "public_key_pem": self.pem,
            "active": retired_time is None,
            "retired_time": retired_time,
        }


def certify_rows(
    votes: Sequence[Mapping[int, int]],
    selected: Sequence[int],
    *,
    n: int,
    alpha: float,
    sigma: float,
    bound: str = "cohen",
    num_classes: int = 10,
) -> list[dict[str, Any]]:
    """CERTIFY's rows (as the engine reports them, elapsed_s included) for each input's vote
    counts by class (they must sum to n) and selected class, with the engine's own statistics."""
    counts = np.zeros((len(votes), num_classes), dtype=np.int64)
    for i, v in enumerate(votes):
        for c, k in v.items():
            counts[i, c] = k
    assert (counts.sum(axis=1) == n).all()
    c_hat = np.asarray(selected)
    n_a = counts[np.arange(len(votes)), c_hat]
    p_b: np.ndarray | None = None
    if bound == "cohen":
        p_a, radius, abstained = bounds.cohen_radius(n_a, n, alpha, sigma)
    else:
        p_a, p_b, radius, abstained = bounds.top2_radius(counts, c_hat, alpha, sigma)
    cap = bounds.radius_cap(n, alpha, sigma, bound, num_classes)  # type: ignore[arg-type]
    rows = []
    for i in range(len(votes)):
        row: dict[str, Any] = {
            "index": i,
            "prediction": None if abstained[i] else int(c_hat[i]),
            "radius": float(radius[i]),
            "p_a_lower": float(p_a[i]),
            "n_a": int(n_a[i]),
            "n": n,
            "radius_cap": cap,
            "elapsed_s": 0.01,
            "votes": {str(c): int(counts[i, c]) for c in np.flatnonzero(counts[i])},
            "abstained": bool(abstained[i]),
        }
        if p_b is not None:
            row["p_b_upper"] = float(p_b[i])
        rows.append(row)
    return rows


def predict_rows(votes: Sequence[Mapping[int, int]], *, n: int, alpha: float) -> list[dict]:
    """PREDICT's rows for each input's vote counts, as the engine computes them."""
    rows = []
    for i, v in enumerate(votes):
        ranked = sorted(v.items(), key=lambda kv: -kv[1]) + [(-1, 0), (-1, 0)]
        n_a, n_b = ranked[0][1], ranked[1][1]
        p_value = bounds.predict_p_value(n_a, n_b)
        rows.append(
            {
                "index": i,
                "prediction": None if p_value > alpha else int(ranked[0][0]),
                "p_value": p_value,
                "n_a": n_a,
                "n_b": n_b,
                "n": n,
                "elapsed_s": 0.01,
                "votes": {str(c): int(k) for c, k in sorted(v.items()) if k},
                "abstained": p_value > alpha,
            }
        )
    return rows


def summary(rows: Sequence[Mapping[str, Any]], mode: str) -> dict[str, Any]:
    """Accuracy, certified accuracy at the curve's radii and ACR of labelled rows."""
    right = [r["prediction"] is not None and r["prediction"] == r["label"] for r in rows]
    out: dict[str, Any] = {"labelled": len(rows), "accuracy": float(np.mean(right))}
    if mode == "certify":
        radii = [float(r["radius"]) for r in rows]
        shares = certified_accuracy(right, radii, DEFAULT_CURVE_RADII)
        out["certified_accuracy"] = [
            {"radius": float(r), "accuracy": float(a)} for r, a in zip(DEFAULT_CURVE_RADII, shares)
        ]
        out["acr"] = float(np.mean([rad if ok else 0.0 for ok, rad in zip(right, radii)]))
    return out


def statement(
    rows: list[dict[str, Any]],
    x: np.ndarray,
    *,
    sigma: float,
    alpha: float,
    n: int,
    n0: int = 100,
    mode: str = "certify",
    bound: str = "cohen",
    seed: int = 7,
    labels: Sequence[int] | None = None,
    model_sha256: str = MODEL_SHA256,
    provenance: Mapping[str, Any] | None = None,
    dataset: Mapping[str, Any] | None = None,
    chunks: Sequence[Mapping[str, Any]] | None = None,
    extra_params: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The in-toto statement of a job with these rows; ``x``: the inputs as certified (float32
    in [0, 1]), one per row, whose digests the statement names."""
    if labels is not None:
        for row, label in zip(rows, labels):
            row["label"] = int(label)
    params = {
        "model_id": "m1",
        "mode": mode,
        "sigma": sigma,
        "n0": n0,
        "n": n,
        "alpha": alpha,
        "bound": bound,
        "batch_size": None,
        "seed": seed,
        "num_inputs": len(rows),
        "runtime": "torch",
        "precision": "float32",
        **(extra_params or {}),
    }
    return certificates.statement(
        job={
            "id": "job-1",
            "kind": mode,
            "owner": "default",
            "params": params,
            "seed_source": "client",
            "provenance": dict(provenance or {"runtime": "torch", "model_sha256": model_sha256}),
            "summary": summary(rows, mode) if labels is not None else None,
        },
        model=model or {"id": "m1", "name": "digits", "sha256": model_sha256, "format": "onnx"},
        rows=rows,
        digests=certificates.input_digests(x),
        dataset=dataset,
        chunks=chunks,
        issued_time="2025-01-01T00:00:00Z",
    )


def write(path: Path, envelope: Mapping[str, Any]) -> Path:
    """The envelope as the service serves it."""
    path.write_bytes(certificates.envelope_bytes(envelope))
    return path


def payload(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """The statement inside an envelope, unverified (to change it and sign it again)."""
    import base64

    return json.loads(base64.b64decode(envelope["payload"]))
