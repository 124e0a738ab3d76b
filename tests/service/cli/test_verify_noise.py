"""`smoothcert verify` of discrete-noise certificates: K, the thresholds' digest and
alpha_effective recomputed; the guarantee says what holds."""

import subprocess
import sys

import numpy as np
import pytest

from smoothcert.service.cli.main import main
from smoothcert.service.core.images import to_unit
from smoothcert.worker.smoothing.discrete import alpha_effective, thresholds
from tests.support import certificates as tc

SIGMA, ALPHA, N = 0.25, 0.001, 1000
VOTES = [{3: 990, 5: 10}, {1: 700, 2: 300}]
SELECTED = [3, 1]


def _noise(**change):
    table = thresholds(SIGMA)
    fields = {
        "noise": "discrete",
        "noise_k": table.k,
        "thresholds_sha256": table.sha256,
        "total_variation": table.total_variation,
        "input_size": 64,
        "alpha_effective": alpha_effective(ALPHA, table.total_variation, 64 * N),
        "quantize": False,
    }
    return {**fields, **change}


def _statement(provenance, **params):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 1, 8, 8), dtype=np.uint8)
    rows = tc.certify_rows(VOTES, SELECTED, n=N, alpha=ALPHA, sigma=SIGMA, bound="cohen")
    return tc.statement(
        rows,
        to_unit(pixels),
        sigma=SIGMA,
        alpha=ALPHA,
        n=N,
        provenance=provenance,
        extra_params={"noise": "discrete", **params},
    )


def _verify(capsys, tmp_path, statement):
    signer = tc.Signer()
    cert = tc.write(tmp_path / "cert.json", signer.sign(statement))
    pem = signer.write_pem(tmp_path / "key.pem")
    code = main(["verify", str(cert), "--key", str(pem)])
    return code, capsys.readouterr().err


def test_a_discrete_certificate_verifies_and_says_what_holds(capsys, tmp_path):
    statement = _statement(_noise())
    predicate = statement["predicate"]
    assert predicate["noise"]["kind"] == "discrete" and predicate["noise"]["noise_k"] == 1
    words = predicate["guarantee"]
    assert "8-bit grid" in words and "alpha_effective" in words and "round(255 z)" in words
    assert "rounded images" not in words
    code, err = _verify(capsys, tmp_path, statement)
    assert code == 0, err
    assert "noise: ok (discrete noise: K = 1, thresholds sha256 " in err


def test_a_quantized_certificate_says_it_is_about_the_rounded_image():
    words = _statement(_noise(quantize=True), quantize=True)["predicate"]["guarantee"]
    assert "rounded onto the 8-bit grid" in words


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"thresholds_sha256": "0" * 64}, "noise.thresholds_sha256 is"),
        ({"alpha_effective": ALPHA}, "noise.alpha_effective is"),
        ({"noise_k": 2}, "noise.noise_k is 2, recomputed 1"),
        ({"input_size": 0}, "noise.input_size is 0"),
    ],
)
def test_a_wrong_noise_field_fails(capsys, tmp_path, change, phrase):
    code, err = _verify(capsys, tmp_path, _statement(_noise(**change)))
    assert code == 1 and f"noise: {phrase}" in err


def test_a_gaussian_certificate_names_its_noise_and_has_nothing_to_recompute(capsys, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 1, 8, 8), dtype=np.uint8)
    rows = tc.certify_rows(VOTES, SELECTED, n=N, alpha=ALPHA, sigma=SIGMA, bound="cohen")
    statement = tc.statement(rows, to_unit(pixels), sigma=SIGMA, alpha=ALPHA, n=N)
    assert statement["predicate"]["noise"] == {"kind": "gaussian"}
    code, err = _verify(capsys, tmp_path, statement)
    assert code == 0 and "noise:" not in err


@pytest.mark.process
def test_the_noise_check_imports_no_torch(tmp_path):
    signer = tc.Signer()
    cert = tc.write(tmp_path / "cert.json", signer.sign(_statement(_noise())))
    pem = signer.write_pem(tmp_path / "key.pem")
    run = (
        "import sys\n"
        "from smoothcert.service.cli.main import main\n"
        "assert main(sys.argv[1:]) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", run, "verify", str(cert), "--key", str(pem)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "noise: ok" in done.stderr
