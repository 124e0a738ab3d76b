"""The CLI refuses σ, α and n beyond the bounds of service/core/params.py before it loads a model
or sends a request: exit status 2 and the engine's one-line message."""

from __future__ import annotations

import numpy as np
import pytest

from smoothcert.service.cli.main import main

BEYOND = [
    (["--sigma", "1e308"], "sigma must be at most 1000"),
    (["--alpha", "5e-324"], "alpha must lie in [1e-20, 0.5]"),
    (["--alpha", "0.7"], "alpha must lie in [1e-20, 0.5]"),
    (["--n", "5"], "n=5 is too small for alpha=0.001"),
    (["--n", "10", "--bound", "top2"], "CERTIFY needs n >= 11"),
]


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("extra,message", BEYOND)
def test_local_certify_refuses_before_loading_the_model(tmp_path, capsys, extra, message):
    np.save(tmp_path / "x.npy", np.zeros((1, 8, 8), np.float32))
    # No such model file: the bound is reported first, so nothing was loaded.
    options = {"--sigma": "0.25", "--n0": "10", "--n": "100", **dict(zip(extra[::2], extra[1::2]))}
    code, err = _run(
        [
            "certify",
            str(tmp_path / "absent.onnx"),
            "--inputs",
            str(tmp_path / "x.npy"),
            *(a for pair in options.items() for a in pair),
        ],
        capsys,
    )
    assert code == 2 and err.startswith("smoothcert: error:") and message in err and "\n" not in err


@pytest.mark.parametrize("extra,message", BEYOND)
def test_submit_refuses_before_sending(tmp_path, capsys, extra, message):
    np.save(tmp_path / "x.npy", np.zeros((1, 8, 8), np.float32))
    options = {"--sigma": "0.25", **dict(zip(extra[::2], extra[1::2]))}
    # Nothing listens at port 9: an attempt to send would be a connection error instead.
    code, err = _run(
        [
            "submit",
            "m",
            "--inputs",
            str(tmp_path / "x.npy"),
            "--url",
            "http://127.0.0.1:9",
            "--api-key",
            "k",
            *(a for pair in options.items() for a in pair),
        ],
        capsys,
    )
    assert code == 2 and message in err and "\n" not in err


def test_predict_has_no_least_n_of_certify_but_the_same_sigma_bound(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((1, 8, 8), np.float32))
    code, err = _run(
        [
            "predict",
            str(tmp_path / "absent.onnx"),
            "--inputs",
            str(tmp_path / "x.npy"),
            "--sigma",
            "0.25",
            "--n",
            "5",
        ],
        capsys,
    )
    assert code == 2 and "no such file" in err
    code, err = _run(
        [
            "predict",
            str(tmp_path / "absent.onnx"),
            "--inputs",
            str(tmp_path / "x.npy"),
            "--sigma",
            "2000",
        ],
        capsys,
    )
    assert code == 2 and "sigma must be at most 1000" in err


def test_the_help_names_the_bounds(capsys):
    with pytest.raises(SystemExit):
        main(["certify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "at most 1000" in text and "[1e-20, 0.5]" in text
