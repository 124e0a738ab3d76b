"""``smoothcert certify|predict ... --certificate OUT.json [--signing-key KEY.pem]``: the service's
certificate format (docs/certificate.md) for a local run.

The statement is built as the service builds it: the model file's digest (a pipeline's from its
parts), each input's digest as certified, the parameters, the seed (``client``: whoever ran the
command chose it or let the engine draw it, and could have run again), the rows, the summary and
the provenance, with ``requested_by`` naming the local user. Signed with ``--signing-key`` (an
Ed25519 PKCS#8 PEM, as ``SMOOTHCERT_SIGNING_KEY_FILE``); without one the envelope carries no
signature, and ``smoothcert verify`` says so: its digest and arithmetic checks still apply.
"""

from __future__ import annotations

import base64
import getpass
import time
from pathlib import Path
from typing import Any

import numpy as np

from smoothcert.service.core.certificates import (
    PAYLOAD_TYPE,
    canonical_json,
    envelope_bytes,
    input_digests,
    sign,
    statement,
    summary,
    utc_text,
)
from smoothcert.service.core.contract import CertifyJob, CertifyParams


def write(
    path: str | Path,
    params: CertifyParams,
    model_info: Any,
    x: np.ndarray,
    rows: list[dict[str, Any]],
    provenance: dict[str, Any],
    labels: np.ndarray | None,
    signing_key: str | None,
) -> str:
    """Write the certificate of a local run to ``path``; the key id that signed it, or ""."""
    batch = x[None] if x.ndim == 3 else x
    rows = [{k: v for k, v in r.items()} for r in rows]
    if labels is not None:
        for row in rows:
            row["label"] = int(labels[row["index"]])
    seed = provenance.get("seed", params.seed)
    record_params = CertifyJob(params.with_seed(seed) if seed is not None else params, len(batch))
    model = {
        "id": Path(str(params.model_id)).name,
        "name": getattr(model_info, "name", None),
        "sha256": provenance.get("model_sha256") or getattr(model_info, "sha256", ""),
        "arch": getattr(model_info, "arch", None),
        "num_classes": getattr(model_info, "num_classes", None),
    }
    document = statement(
        job={
            "id": "local",
            "kind": params.mode,
            "owner": f"local:{getpass.getuser()}",
            "params": record_params.record_params(),
            "seed_source": "client",
            "provenance": provenance,
            "summary": summary(rows, params.mode),
        },
        model=model,
        rows=rows,
        digests=input_digests(batch),
        dataset=None,
        chunks=None,
        issued_time=utc_text(time.time()),
    )
    keyid = ""
    if signing_key:
        from smoothcert.service.core.signing import key_id, read_private_key

        key = read_private_key(Path(signing_key))
        keyid = key_id(key.public_key())
        envelope = sign(document, key, keyid)
    else:
        envelope = {
            "payload": base64.b64encode(canonical_json(document)).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [],
        }
    Path(path).write_bytes(envelope_bytes(envelope))
    return keyid
