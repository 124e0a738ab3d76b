"""`smoothcert verify`: signature, digests and arithmetic offline; --recompute through the engine.

Certificates are built with the service's own statement and signing code, from rows that the
engine's statistics (worker/smoothing/bounds.py) computed for made-up counts, so every number in
them is exact; each test then changes one thing and expects the check that covers it to fail.
"""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from smoothcert.service.cli import verify
from smoothcert.service.cli.main import main
from smoothcert.service.core.certificates import arrays_digest, input_digest
from smoothcert.service.core.contract import chunk_seed
from smoothcert.service.core.images import to_unit
from smoothcert.worker.smoothing import bounds
from tests.support import certificates as tc

SIGMA, ALPHA, N = 0.25, 0.001, 1000
# made-up estimation votes per input, the class the selection chose, and the labels
VOTES = [{3: 990, 5: 10}, {1: 700, 2: 300}, {4: 520, 7: 480}, {0: 1000}, {8: 300, 9: 700}]
SELECTED = [3, 1, 4, 0, 9]  # row 2 abstains (p_A_lower < 1/2); row 3 is wrong (label 6)
LABELS = [3, 1, 4, 6, 9]


@pytest.fixture
def signer():
    return tc.Signer()


@pytest.fixture
def pixels():
    """The inputs as uploaded: uint8 (5, 1, 8, 8)."""
    return np.random.default_rng(0).integers(0, 256, (5, 1, 8, 8), dtype=np.uint8)


def _statement(pixels, bound="cohen", **kw):
    rows = tc.certify_rows(VOTES, SELECTED, n=N, alpha=ALPHA, sigma=SIGMA, bound=bound)
    return tc.statement(
        rows, to_unit(pixels), sigma=SIGMA, alpha=ALPHA, n=N, bound=bound, labels=LABELS, **kw
    )


def _verify(capsys, tmp_path, signer, statement, *extra, envelope=None):
    cert = tc.write(tmp_path / "cert.json", envelope or signer.sign(statement))
    pem = signer.write_pem(tmp_path / "key.pem")
    code = main(["verify", str(cert), "--key", str(pem), *map(str, extra)])
    return code, capsys.readouterr().err


def test_a_certificate_verifies(capsys, tmp_path, signer, pixels):
    code, err = _verify(capsys, tmp_path, signer, _statement(pixels))
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0] == f"signature: ok (key {signer.keyid[:12]})"
    assert lines[1].startswith("statement: ok (job job-1, CERTIFY of 5 rows")
    assert lines[2].startswith(
        "arithmetic: ok (5 CERTIFY rows recomputed to 1e-12, and the summary"
    )


def test_the_rows_are_what_the_bounds_give(pixels):
    """Every row's p_A_lower and radius recomputed from its counts to 1e-12 (the rows' own test)."""
    rows = _statement(pixels)["predicate"]["rows"]
    assert [r["abstained"] for r in rows] == [False, False, True, False, False]
    for row in rows:
        p, radius, abstained = bounds.cohen_radius(row["n_a"], N, ALPHA, SIGMA)
        assert abs(row["p_a_lower"] - float(p)) <= 1e-12
        assert abs(row["radius"] - float(radius)) <= 1e-12
        assert bool(abstained) == row["abstained"]


def test_one_byte_of_the_payload_changed_fails_the_signature(capsys, tmp_path, signer, pixels):
    envelope = signer.sign(_statement(pixels))
    body = bytearray(base64.b64decode(envelope["payload"]))
    at = body.index(b'"radius":') + len(b'"radius":')
    body[at] = ord("9") if body[at] != ord("9") else ord("8")
    envelope["payload"] = base64.b64encode(bytes(body)).decode()
    code, err = _verify(capsys, tmp_path, signer, None, envelope=envelope)
    assert code == 1
    assert err.splitlines() == [
        "signature: the signature does not match the payload (changed after signing?)"
    ]


def test_another_key_fails_the_signature(capsys, tmp_path, signer, pixels):
    other = tc.Signer()
    code, err = _verify(capsys, tmp_path, signer, None, envelope=other.sign(_statement(pixels)))
    assert code == 1
    assert err.startswith(f"signature: signed with key {other.keyid}, which is not among")


def _resigned(capsys, tmp_path, signer, statement, *extra):
    """Verify a changed statement signed again with the right key: only its content is wrong."""
    return _verify(capsys, tmp_path, signer, statement, *extra)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(radius=r["radius"] + 1e-6), "arithmetic: row 1: radius is"),
        (lambda r: r.update(radius=r["radius"] + 2e-12), "arithmetic: row 1: radius is"),
        (lambda r: r.update(p_a_lower=r["p_a_lower"] - 1e-9), "arithmetic: row 1: p_a_lower is"),
        (lambda r: r.update(n_a=r["n_a"] + 1), "arithmetic: row 1: n_a is 701, the prediction 1"),
        (lambda r: r["votes"].update({"1": 701}), "arithmetic: row 1: votes sum to 1001"),
        (lambda r: r["votes"].update({"1": 699, "2": 301}), "arithmetic: row 1: n_a is 700"),
        (lambda r: r.update(radius_cap=1.0), "arithmetic: row 1: radius_cap is 1.0"),
        (lambda r: r.update(prediction=None, abstained=True), "arithmetic: row 1: p_a_lower"),
    ],
)
def test_a_changed_row_fails_the_arithmetic(capsys, tmp_path, signer, pixels, change, message):
    statement = _statement(pixels)
    change(statement["predicate"]["rows"][1])
    code, err = _resigned(capsys, tmp_path, signer, statement)
    assert code == 1
    assert message in err
    assert "signature: ok" in err


def test_a_radius_within_the_tolerance_verifies(capsys, tmp_path, signer, pixels):
    statement = _statement(pixels)
    statement["predicate"]["rows"][1]["radius"] += 1e-13
    code, err = _resigned(capsys, tmp_path, signer, statement)
    assert code == 0, err


def test_a_changed_summary_fails(capsys, tmp_path, signer, pixels):
    statement = _statement(pixels)
    summary = statement["predicate"]["summary"]
    assert summary["accuracy"] == 0.6 and summary["labelled"] == 5
    summary["acr"] += 0.01
    summary["certified_accuracy"][1]["accuracy"] = 0.8
    code, err = _resigned(capsys, tmp_path, signer, statement)
    assert code == 1
    assert "arithmetic: summary: certified accuracy at 0.25 is 0.8, recomputed 0.2" in err
    assert "arithmetic: summary: acr is" in err


def test_inputs_right_and_wrong(capsys, tmp_path, signer, pixels):
    statement = _statement(pixels)
    np.save(tmp_path / "x.npy", pixels)
    code, err = _verify(capsys, tmp_path, signer, statement, "--inputs", tmp_path / "x.npy")
    assert code == 0, err
    assert "inputs: ok (5 inputs match their rows' digests)" in err
    np.save(tmp_path / "unit.npy", to_unit(pixels))  # the same inputs as floats in [0, 1]
    code, err = _verify(capsys, tmp_path, signer, statement, "--inputs", tmp_path / "unit.npy")
    assert code == 0, err
    wrong = pixels.copy()
    wrong[3, 0, 4, 4] ^= 1
    np.save(tmp_path / "wrong.npy", wrong)
    code, err = _verify(capsys, tmp_path, signer, statement, "--inputs", tmp_path / "wrong.npy")
    assert code == 1
    assert err.count("inputs: ") == 1 and "inputs: row 3: the input's sha256 is" in err
    np.save(tmp_path / "short.npy", pixels[:4])
    code, err = _verify(capsys, tmp_path, signer, statement, "--inputs", tmp_path / "short.npy")
    assert code == 1 and "inputs: 4 inputs given, the certificate has 5 rows" in err


def test_png_inputs_are_decoded_as_the_service_does(capsys, tmp_path, signer, pixels):
    statement = _statement(pixels)
    files = []
    for i, p in enumerate(pixels):
        files.append(tmp_path / f"digit-{i}.png")
        Image.fromarray(p[0], mode="L").save(files[-1])
    code, err = _verify(capsys, tmp_path, signer, statement, "--inputs", *files)
    assert code == 0, err
    code, err = _verify(capsys, tmp_path, signer, statement, "--inputs", *files[::-1])
    assert code == 1 and "inputs: row 0:" in err


def test_a_changed_input_digest(capsys, tmp_path, signer, pixels):
    statement = _statement(pixels)
    other = input_digest(np.zeros((1, 8, 8), np.float32))
    statement["subject"][3]["digest"]["sha256"] = other  # input:2
    statement["predicate"]["rows"][2]["input_sha256"] = other
    np.save(tmp_path / "x.npy", pixels)
    code, err = _resigned(capsys, tmp_path, signer, statement, "--inputs", tmp_path / "x.npy")
    assert code == 1
    assert "inputs: row 2: the input's sha256 is" in err
    statement["predicate"]["rows"][2]["input_sha256"] = "00" * 32  # no longer its subject's
    code, err = _resigned(capsys, tmp_path, signer, statement)
    assert code == 1 and "statement: row 2: its input_sha256 is not its subject's" in err


def test_the_model_file(capsys, tmp_path, signer, pixels):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not really a model")
    import hashlib

    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    statement = _statement(pixels, model_sha256=sha)
    code, err = _verify(capsys, tmp_path, signer, statement, "--model", model)
    assert code == 0 and f"model: ok (model.onnx has sha256 {sha[:12]})" in err
    model.write_bytes(b"another model")
    code, err = _verify(capsys, tmp_path, signer, statement, "--model", model)
    assert code == 1 and "model: " in err and "the certificate names" in err


def test_model_is_refused_for_a_pipeline(capsys, tmp_path, signer, pixels):
    pipeline = {"id": "m1", "sha256": tc.MODEL_SHA256, "kind": "pipeline", "parts": ["d", "c"]}
    statement = _statement(pixels, model=pipeline)
    (tmp_path / "c.onnx").write_bytes(b"x")
    code, err = _verify(capsys, tmp_path, signer, statement, "--model", tmp_path / "c.onnx")
    assert code == 2 and "pipeline" in err and "single models only" in err


def test_top2_certificate_verifies_and_its_class_count_is_found(capsys, tmp_path, signer, pixels):
    statement = _statement(pixels, bound="top2")
    assert "p_b_upper" in statement["predicate"]["rows"][0]
    code, err = _verify(capsys, tmp_path, signer, statement)
    assert code == 0, err
    assert "; 10 classes (from radius_cap))" in err
    statement["predicate"]["rows"][1]["votes"] = {"1": 700, "2": 200, "6": 100}
    code, err = _resigned(capsys, tmp_path, signer, statement)
    assert code == 1 and "arithmetic: row 1: p_b_upper is" in err


def test_predict_certificate(capsys, tmp_path, signer, pixels):
    votes = [{3: 99, 5: 1}, {1: 60, 2: 40}, {0: 100}]
    rows = tc.predict_rows(votes, n=100, alpha=ALPHA)
    assert [r["abstained"] for r in rows] == [False, True, False]
    statement = tc.statement(
        rows, to_unit(pixels[:3]), sigma=SIGMA, alpha=ALPHA, n=100, mode="predict", labels=[3, 1, 2]
    )
    code, err = _verify(capsys, tmp_path, signer, statement)
    assert code == 0, err
    statement["predicate"]["rows"][2]["p_value"] = 1e-3
    code, err = _resigned(capsys, tmp_path, signer, statement)
    assert code == 1 and "arithmetic: row 2: p_value is 0.001, recomputed" in err


def _dataset_statement(x, y, first, count, chunk_size, seed=11):
    rows = tc.certify_rows(
        VOTES[:count], SELECTED[:count], n=N, alpha=ALPHA, sigma=SIGMA, num_classes=10
    )
    for i, row in enumerate(rows):
        row["index"] = first + i
    chunks = [
        {
            "index": i,
            "first": a,
            "count": min(chunk_size, first + count - a),
            "seed": chunk_seed(seed, i),
        }
        for i, a in enumerate(range(first, first + count, chunk_size))
    ]
    dataset = {"id": "d1", "name": "digits", "arrays_sha256": arrays_digest({"x": x, "y": y})}
    return tc.statement(
        rows,
        to_unit(x[first : first + count]),
        sigma=SIGMA,
        alpha=ALPHA,
        n=N,
        seed=seed,
        labels=y[first : first + count].tolist(),
        dataset=dataset,
        chunks=chunks,
        extra_params={"dataset_id": "d1", "skip": first, "limit": count, "chunk_size": chunk_size},
    )


def test_dataset(capsys, tmp_path, signer):
    x = np.random.default_rng(1).integers(0, 256, (9, 1, 8, 8), dtype=np.uint8)
    y = np.arange(9, dtype=np.int64) % 10
    np.savez(tmp_path / "d.npz", x=x, y=y)
    statement = _dataset_statement(x, y, first=2, count=5, chunk_size=2)
    code, err = _verify(capsys, tmp_path, signer, statement, "--dataset", tmp_path / "d.npz")
    assert code == 0, err
    assert "dataset: ok (d.npz is dataset d1" in err and "5 rows match their inputs" in err
    x2 = x.copy()
    x2[4, 0, 0, 0] ^= 1  # row 4 (the third row of the job)
    np.savez(tmp_path / "d2.npz", x=x2, y=y)
    code, err = _verify(capsys, tmp_path, signer, statement, "--dataset", tmp_path / "d2.npz")
    assert code == 1
    assert "dataset: d2.npz" not in err and "its arrays' sha256 is" in err
    assert "dataset: row 4: x[4] does not have the row's sha256" in err
    statement["predicate"]["chunks"][1]["seed"] += 1
    code, err = _resigned(capsys, tmp_path, signer, statement)
    assert code == 1 and "arithmetic: chunk 1: seed" in err


def test_dataset_of_floats_wider_than_float32_is_digested_as_stored(capsys, tmp_path, signer):
    x = np.random.default_rng(2).random((5, 1, 8, 8))  # float64: the service stores float32
    y = np.zeros(5, dtype=np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    stored = x.astype(np.float32)
    rows = tc.certify_rows(VOTES, SELECTED, n=N, alpha=ALPHA, sigma=SIGMA)
    statement = tc.statement(
        rows,
        stored,
        sigma=SIGMA,
        alpha=ALPHA,
        n=N,
        dataset={"id": "d1", "arrays_sha256": arrays_digest({"x": stored, "y": y})},
        extra_params={"dataset_id": "d1", "skip": 0, "limit": None, "chunk_size": 5},
    )
    code, err = _verify(capsys, tmp_path, signer, statement, "--dataset", tmp_path / "d.npz")
    assert code == 0, err


def test_a_retired_key_in_keys_json_still_verifies(capsys, tmp_path, signer, pixels):
    active = tc.Signer()
    listing = {"keys": [active.listing(), signer.listing("2025-02-01T00:00:00Z")]}
    (tmp_path / "keys.json").write_text(json.dumps(listing))
    cert = tc.write(tmp_path / "cert.json", signer.sign(_statement(pixels)))
    code = main(["verify", str(cert), "--keys", str(tmp_path / "keys.json")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"signature: ok (key {signer.keyid[:12]}, retired 2025-02-01T00:00:00Z)" in err
    listing["keys"][1]["keyid"] = active.keyid  # a listing whose ids are not its keys'
    (tmp_path / "keys.json").write_text(json.dumps(listing))
    assert main(["verify", str(cert), "--keys", str(tmp_path / "keys.json")]) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give the service's public keys"),
        (["--key", "missing.pem"], "no such file: missing.pem"),
        (["--key", "cert.json"], "not an Ed25519 public key"),
        (["--key", "key.pem", "--recompute"], "--recompute needs --model and the inputs"),
        (["--key", "key.pem", "--dataset", "d.npz"], "not of a dataset job"),
    ],
)
def test_unusable_arguments_exit_2(capsys, tmp_path, signer, pixels, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tc.write(tmp_path / "cert.json", signer.sign(_statement(pixels)))
    signer.write_pem(tmp_path / "key.pem")
    np.savez(tmp_path / "d.npz", x=pixels, y=np.zeros(5, np.int64))
    assert main(["verify", "cert.json", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1


def test_not_a_certificate_exits_2(capsys, tmp_path, signer):
    (tmp_path / "cert.json").write_text("not json")
    signer.write_pem(tmp_path / "key.pem")
    assert main(["verify", str(tmp_path / "cert.json"), "--key", str(tmp_path / "key.pem")]) == 2


def test_the_fresh_seed_rule_flags_a_bound_the_fresh_counts_rule_out():
    """Deterministic: made-up fresh counts. p_A_lower 0.9 against 500 of 1000 fresh votes is ruled
    out at any level used here; against 990 of 1000 it is not."""
    certified = [{"index": 0, "prediction": 3, "p_a_lower": 0.9}, {"index": 1, "prediction": None}]
    low = [{"n": 1000, "votes": {"3": 500, "1": 500}}, {"n": 1000, "votes": {"1": 1000}}]
    high = [{"n": 1000, "votes": {"3": 990, "1": 10}}, {"n": 1000, "votes": {"1": 1000}}]
    assert verify._fresh_problems(certified, high, 0.001) == []
    (problem,) = verify._fresh_problems(certified, low, 0.001)
    assert problem.startswith("row 0: class 3 got 500 of 1000 fresh votes")


@pytest.mark.process
def test_verify_imports_no_torch(tmp_path, signer, pixels):
    """Checks (a)-(c) in a fresh interpreter: the engine's bounds load, torch does not."""
    cert = tc.write(tmp_path / "cert.json", signer.sign(_statement(pixels)))
    pem = signer.write_pem(tmp_path / "key.pem")
    np.save(tmp_path / "x.npy", pixels)
    run = (
        "import sys\n"
        "from smoothcert.service.cli.main import main\n"
        "code = main(sys.argv[1:])\n"
        "assert code == 0, code\n"
        "assert 'smoothcert.worker.smoothing.bounds' in sys.modules\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('no torch')\n"
    )
    args = ["verify", str(cert), "--key", str(pem), "--inputs", str(tmp_path / "x.npy")]
    done = subprocess.run(
        [sys.executable, "-c", run, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no torch" in done.stdout and "arithmetic: ok" in done.stderr


def _small_model(tmp_path):
    """A digits_cnn with fixed random weights, as a self-describing safetensors file."""
    import torch

    from smoothcert.models.architectures import build_network
    from smoothcert.models.loaders import load_model
    from smoothcert.models.metadata import ModelInfo
    from smoothcert.models.safetensors_io import save_safetensors_model

    torch.manual_seed(0)
    path = tmp_path / "digits.safetensors"
    save_safetensors_model(
        path,
        build_network("digits_cnn", 10),
        ModelInfo(format="safetensors", input_shape=(1, 8, 8), num_classes=10, arch="digits_cnn"),
    )
    return path, load_model(path, device="cpu")


def test_recompute_reruns_each_chunk_of_a_dataset_job(capsys, tmp_path, signer):
    """Each chunk with its own seed: identical rows. Fresh seed at level 0.001 (see below)."""
    from smoothcert.service.core.contract import CertifyParams
    from smoothcert.worker.smoothing import RunOptions, run_params

    path, model = _small_model(tmp_path)
    x = np.random.default_rng(4).integers(0, 256, (7, 1, 8, 8), dtype=np.uint8)
    y = np.arange(7, dtype=np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    params = CertifyParams(model_id="m1", sigma=0.25, n0=20, n=300, alpha=0.001, seed=9)
    rows, chunks, per_chunk = [], [], []
    for i, a in enumerate(range(1, 6, 2)):  # skip 1, limit 5, chunks of 2
        b = min(a + 2, 6)
        run = run_params(
            model, to_unit(x[a:b]), params, RunOptions(batch_size=32, seed=chunk_seed(9, i))
        ).to_dict()
        for row in run["results"]:
            row["index"] += a
        rows += run["results"]
        chunks.append({"index": i, "first": a, "count": b - a, "seed": chunk_seed(9, i)})
        per_chunk.append({"chunk": i, "batch_size": 32})
        provenance = run["provenance"]
    provenance = {**provenance, "chunks": per_chunk, "batch_size": 32}
    statement = tc.statement(
        rows,
        to_unit(x[1:6]),
        sigma=0.25,
        alpha=0.001,
        n=300,
        n0=20,
        seed=9,
        model_sha256=provenance["model_sha256"],
        provenance=provenance,
        dataset={"id": "d1", "arrays_sha256": arrays_digest({"x": x, "y": y})},
        chunks=chunks,
        extra_params={"dataset_id": "d1", "skip": 1, "limit": 5, "chunk_size": 2, "chunks": 3},
    )
    code, err = _verify(
        capsys,
        tmp_path,
        signer,
        statement,
        "--model",
        path,
        "--dataset",
        tmp_path / "d.npz",
        "--recompute",
        "--recompute-seed",
        "77",
    )
    assert code == 0, err
    assert "recompute (same seed): ok (5 of 5 rows identical" in err


def test_recompute_reruns_the_job(capsys, tmp_path, signer):
    """A real run of a small model, certified and then verified with --recompute: the same seed
    gives identical rows on the same device and runtime. The fresh-seed check runs at level
    0.001: with a sound certificate (each bound holds, which fails with probability at most alpha
    = 0.001 per row) it fails with probability at most 0.001; seeds are fixed, so the outcome is
    the same on every run."""
    from smoothcert.service.core.contract import CertifyParams
    from smoothcert.worker.smoothing import RunOptions, run_params

    path, model = _small_model(tmp_path)
    x = np.random.default_rng(3).random((4, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    params = CertifyParams(model_id="m1", sigma=0.25, n0=20, n=400, alpha=0.001, seed=5)
    run = run_params(model, x, params, RunOptions(batch_size=64, seed=5)).to_dict()
    rows, provenance = run["results"], run["provenance"]
    statement = tc.statement(
        copy.deepcopy(rows),
        x,
        sigma=0.25,
        alpha=0.001,
        n=400,
        n0=20,
        seed=5,
        model_sha256=provenance["model_sha256"],
        provenance=provenance,
        extra_params={"batch_size": 64},
    )
    code, err = _verify(
        capsys,
        tmp_path,
        signer,
        statement,
        "--model",
        path,
        "--inputs",
        tmp_path / "x.npy",
        "--recompute",
        "--recompute-seed",
        "123",
    )
    assert code == 0, err
    assert (
        "recompute (same seed): ok (4 of 4 rows identical with seed 5 on cpu/torch/float32)" in err
    )
    assert "recompute (fresh seed): ok (seed 123:" in err


def test_an_unsigned_envelope_is_said_to_be_unsigned(capsys, tmp_path, signer, pixels):
    """A local certificate written without a signing key: its content is still checked."""
    from smoothcert.service.core.certificates import PAYLOAD_TYPE, canonical_json

    envelope = {
        "payload": base64.b64encode(canonical_json(_statement(pixels))).decode(),
        "payloadType": PAYLOAD_TYPE,
        "signatures": [],
    }
    cert = tc.write(tmp_path / "cert.json", envelope)
    assert main(["verify", str(cert)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("signature: none (an unsigned envelope") and "arithmetic: ok" in err
    pem = signer.write_pem(tmp_path / "key.pem")
    assert main(["verify", str(cert), "--key", str(pem)]) == 1
    assert "signature: the envelope is not signed" in capsys.readouterr().err
