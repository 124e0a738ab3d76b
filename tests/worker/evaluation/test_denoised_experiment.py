"""`smoothcert experiment --denoised` on a tiny configuration: every output is there and agrees with
itself, and each row certifies exactly what `smoothcert certify [--denoiser]` certifies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smoothcert.models.denoisers import load_denoiser
from smoothcert.models.loaders import load_model
from smoothcert.service.cli.main import main
from smoothcert.worker.data.datasets import load_digits
from smoothcert.worker.evaluation.analyze import analyze
from smoothcert.worker.evaluation.denoised import (
    ROWS,
    DenoisedConfig,
    plan,
    run_denoised_experiment,
)

pytestmark = pytest.mark.slow

TINY = [
    "--epochs",
    "1",
    "--denoiser-epochs",
    "1",
    "--limit",
    "20",
    "--n0",
    "20",
    "--n",
    "100",
    "--seed",
    "3",
]
ROWS_HERE = (
    "gaussian",
    "standard",
    "mse",
    "stability",
)  # diffusion is another branch's, merged later
LABELS = ["gaussian", "standard", "standard + mse", "standard + stability"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """The comparison through the CLI, once for the module: 1 epoch each, 20 images, n = 100."""
    out = tmp_path_factory.mktemp("denoised")
    assert (
        main(
            [
                "experiment",
                "--denoised",
                "--rows",
                ",".join(ROWS_HERE),
                *TINY,
                "--out-dir",
                str(out),
            ]
        )
        == 0
    )
    return out


def _tsv(path):
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def _untimed(rows):
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def test_every_output_is_written_and_consistent(experiment):
    assert sorted(p.name for p in (experiment / "models").iterdir()) == [
        "gaussian.safetensors",
        "mse.safetensors",
        "stability.safetensors",
        "standard.safetensors",
    ]
    table = (experiment / "certified_accuracy.md").read_text().splitlines()
    assert table[0] == "| base classifier | 0 | 0.25 | 0.5 | 0.75 |" and len(table) == 2 + len(
        LABELS
    )
    assert [line.split(" | ")[0].removeprefix("| ") for line in table[2:]] == LABELS
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["config"]["rows"] == list(ROWS_HERE) and summary["test_size"] == 20
    assert sorted(summary["models"]) == sorted(ROWS_HERE)
    assert all(m["train_s"] > 0 and m["training"]["seed"] == 3 for m in summary["models"].values())
    # summary.json's table is the TSV's, value for value
    records = [
        {k: v if k == "row" else float(v) for k, v in r.items()}
        for r in _tsv(experiment / "certified_accuracy.tsv")
    ]
    assert records == summary["table"] and [r["row"] for r in records] == LABELS
    for row in summary["rows"]:
        log = experiment / "certify" / f"{row['row']}.tsv"
        assert len(_tsv(log)) == 20
        # the logs are what `smoothcert analyze` reads, and agree with the table
        assert analyze([log], [0.0, 0.25, 0.5, 0.75])["curves"][str(log)] == pytest.approx(
            row["accuracy"]
        )
    assert (experiment / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("denoiser", ["mse", "stability"])
def test_a_row_certifies_what_smoothcert_certify_does(experiment, tmp_path, denoiser):
    """The trained denoisers load with `smoothcert certify standard.safetensors --denoiser FILE`, and
    the same seed and parameters give the row's certificates exactly (only the timing column differs)."""
    digits = load_digits()
    np.save(tmp_path / "x.npy", digits.test_x[:20])
    np.save(tmp_path / "y.npy", digits.test_y[:20])
    models = experiment / "models"
    out = tmp_path / "cli.tsv"
    assert (
        main(
            [
                "certify",
                str(models / "standard.safetensors"),
                "--denoiser",
                str(models / f"{denoiser}.safetensors"),
                "--inputs",
                str(tmp_path / "x.npy"),
                "--labels",
                str(tmp_path / "y.npy"),
                "--sigma",
                "0.5",
                "--n0",
                "20",
                "--n",
                "100",
                "--alpha",
                "0.001",
                "--seed",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    cli, ours = _untimed(_tsv(out)), _untimed(_tsv(experiment / "certify" / f"{denoiser}.tsv"))
    assert len(cli) == 20 and cli == ours


def test_an_unknown_row_is_a_usage_error_naming_the_rows(tmp_path, capsys):
    assert (
        main(["experiment", "--denoised", "--rows", "standard,mixup", "--out-dir", str(tmp_path)])
        == 2
    )
    assert (
        "--rows: mixup; choose from gaussian, standard, mse, stability, diffusion"
        in capsys.readouterr().err
    )
    assert main(["experiment", "--rows", "standard", "--out-dir", str(tmp_path)]) == 2
    assert "--rows: only with --denoised" in capsys.readouterr().err
    assert (
        main(["experiment", "--denoised", "--methods", "gaussian", "--out-dir", str(tmp_path)]) == 2
    )
    assert "--methods: not with --denoised" in capsys.readouterr().err
    assert (
        main(["experiment", "--denoised", "--sigmas", "0.25,0.5", "--out-dir", str(tmp_path)]) == 2
    )
    assert "--denoised compares the rows at one σ" in capsys.readouterr().err
    assert (
        main(["experiment", "--denoised", "--denoiser-epochs", "0", "--out-dir", str(tmp_path)])
        == 2
    )
    assert "epochs must be an integer from 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was trained


def test_every_model_is_trained_before_the_rows_that_stand_on_it():
    assert plan(ROWS) == [
        "train gaussian",
        "certify gaussian",
        "train standard",
        "certify standard",
        "train mse",
        "certify standard + mse",
        "train stability",
        "certify standard + stability",
        "train diffusion",
        "certify standard + diffusion",
    ]
    assert plan(("diffusion", "gaussian")) == [
        "train gaussian",
        "certify gaussian",
        "train standard",
        "train diffusion",
        "certify standard + diffusion",
    ]


def test_stability_alone_trains_the_classifier_and_the_mse_denoiser_it_needs(tmp_path):
    config = DenoisedConfig(rows=("stability",), epochs=1, denoiser_epochs=1, limit=4, n0=10, n=50)
    steps = []
    result = run_denoised_experiment(config, tmp_path, step=steps.append)
    assert steps == [
        "train standard",
        "train mse",
        "train stability",
        "certify standard + stability",
    ]
    assert [r.label for r in result.rows] == ["standard + stability"]
    assert sorted(p.name for p in (tmp_path / "certify").iterdir()) == ["stability.tsv"]
    # the stability denoiser was fine-tuned from the MSE file, for the standard classifier's file
    training = result.models["stability"].training
    assert (
        training["init_sha256"]
        == load_denoiser(tmp_path / "models" / "mse.safetensors").info.sha256
    )
    assert (
        training["classifier_sha256"]
        == load_model(tmp_path / "models" / "standard.safetensors").info.sha256
    )
