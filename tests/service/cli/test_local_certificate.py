"""`smoothcert certify ... --certificate` writes the service's certificate format for a local run,
signed with --signing-key or unsigned without; `smoothcert signing-key show|rotate` manage the
service's key on its data dir."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from smoothcert.models.metadata import sha256_file
from smoothcert.service.cli.main import main
from smoothcert.service.core.certificates import input_digest, open_envelope
from smoothcert.service.core.signing import key_id, load_public_pem


def key_file(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key


def certify(demo_paths, tmp_path, *extra: str) -> int:
    return main(
        [
            "certify",
            str(demo_paths["onnx"]),
            "--inputs",
            str(tmp_path / "x.npy"),
            "--labels",
            str(tmp_path / "y.npy"),
            "--sigma",
            "0.25",
            "--n0",
            "20",
            "--n",
            "200",
            "--seed",
            "5",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "rows.tsv"),
            *extra,
        ]
    )


def test_a_signed_local_certificate(demo_paths, tmp_path, capsys):
    x = np.load(demo_paths["test_x"])[:3]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.load(demo_paths["test_y"])[:3])
    key = key_file(tmp_path / "key.pem")
    cert = tmp_path / "cert.json"
    assert (
        certify(
            demo_paths,
            tmp_path,
            "--certificate",
            str(cert),
            "--signing-key",
            str(tmp_path / "key.pem"),
        )
        == 0
    )
    keyid = key_id(key.public_key())
    statement, signer = open_envelope(json.loads(cert.read_text()), {keyid: key.public_key()})
    assert signer == keyid
    subject = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subject[next(n for n in subject if n.startswith("model:"))] == sha256_file(
        demo_paths["onnx"]
    )
    assert [subject[f"input:{i}"] for i in range(3)] == [input_digest(r) for r in x]
    predicate = statement["predicate"]
    assert predicate["seed"] == {"value": 5, "source": "client"}
    assert predicate["requested_by"]["account"].startswith("local:")
    assert len(predicate["rows"]) == 3 and predicate["summary"]["labelled"] == 3
    tsv = (tmp_path / "rows.tsv").read_text().splitlines()
    assert len(tsv) == 4  # the rows file is written as before
    # The summary says of how many inputs each count is, and which count is which.
    right = sum(r["prediction"] == r["label"] for r in predicate["rows"])
    both = sum(r["prediction"] == r["label"] and r["radius"] > 0 for r in predicate["rows"])
    err = capsys.readouterr().err
    assert f"; {right} of 3 predicted the label, {both} of 3 certified with the label" in err


def test_an_unsigned_local_certificate_says_so(demo_paths, tmp_path):
    np.save(tmp_path / "x.npy", np.load(demo_paths["test_x"])[:1])
    np.save(tmp_path / "y.npy", np.load(demo_paths["test_y"])[:1])
    cert = tmp_path / "cert.json"
    assert certify(demo_paths, tmp_path, "--certificate", str(cert)) == 0
    envelope = json.loads(cert.read_text())
    assert envelope["signatures"] == []
    assert main(["verify", str(cert), "--key", str(tmp_path / "nothing.pem")]) != 0


def test_signing_key_show_and_rotate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SMOOTHCERT_DATA_DIR", str(tmp_path / "data"))
    assert main(["signing-key", "show"]) == 0
    [first] = json.loads(capsys.readouterr().out)["keys"]
    assert first["active"] and first["retired_time"] is None
    load_public_pem(first["public_key_pem"])
    assert main(["signing-key", "rotate"]) == 0
    out, err = capsys.readouterr()
    new = out.strip()
    assert new != first["keyid"] and f"retired signing key {first['keyid']}" in err
    assert main(["signing-key", "show"]) == 0
    keys = json.loads(capsys.readouterr().out)["keys"]
    assert [k["keyid"] for k in keys] == [new, first["keyid"]]
    assert keys[1]["retired_time"] and not keys[1]["active"]
    assert (tmp_path / "data" / "signing" / "active.pem").stat().st_mode & 0o777 == 0o600


def test_a_signing_key_file_that_is_not_one_is_a_clear_error(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    monkeypatch.setenv("SMOOTHCERT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SMOOTHCERT_SIGNING_KEY_FILE", str(bad))
    assert main(["signing-key", "show"]) == 2
    assert str(bad) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["signing-key"])
