"""`smoothcert certify --noise discrete`: the grid rule, --quantize, and what the provenance says."""

import json

import numpy as np
import pytest

from smoothcert.service.cli.main import main


@pytest.fixture(scope="module")
def off_grid(demo_paths, tmp_path_factory):
    """Five demo test digits (values k/16: off the 8-bit grid) as a .npy file."""
    path = tmp_path_factory.mktemp("grid") / "x.npy"
    np.save(path, np.load(demo_paths["test_x"])[:5])
    return path


def certify(model, inputs, *flags):
    return main(
        ["certify", str(model), "--inputs", str(inputs), "--sigma", "0.25", "--n", "200"]
        + ["--seed", "3", *flags]
    )


def test_inputs_off_the_grid_exit_2_with_the_rule(demo_paths, off_grid, capsys):
    assert certify(demo_paths["safetensors"], off_grid, "--noise", "discrete") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "8-bit grid" in err and "--quantize" in err


@pytest.mark.parametrize(
    ("flags", "phrase"),
    [
        (["--quantize"], "quantize rounds inputs"),
        (["--noise", "discrete", "--sigma", "5"], "discrete noise takes sigma at most 4"),
    ],
)
def test_bad_noise_flags_exit_2(demo_paths, off_grid, capsys, flags, phrase):
    assert certify(demo_paths["safetensors"], off_grid, *flags) == 2
    assert phrase in capsys.readouterr().err


def test_quantize_certifies_the_rounded_image(demo_paths, off_grid, tmp_path, capsys):
    out = tmp_path / "r.tsv"
    code = certify(
        demo_paths["safetensors"], off_grid, "--noise", "discrete", "--quantize", "--out", str(out)
    )
    assert code == 0, capsys.readouterr().err
    provenance = json.loads((tmp_path / "r.tsv.json").read_text())
    assert provenance["noise"] == "discrete" and provenance["quantize"] is True
    assert provenance["alpha_effective"] > provenance["alpha"]
    rounded = tmp_path / "rounded.npy"
    np.save(rounded, np.rint(np.load(off_grid) * 255) / np.float32(255))
    again = tmp_path / "again.tsv"
    code = certify(demo_paths["safetensors"], rounded, "--noise", "discrete", "--out", str(again))
    assert code == 0
    rows = [line.split("\t")[2:4] for line in out.read_text().splitlines()]
    assert rows == [line.split("\t")[2:4] for line in again.read_text().splitlines()]
