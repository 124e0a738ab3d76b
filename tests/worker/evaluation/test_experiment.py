"""The comparison command on a tiny grid: every output is written and the table reads right."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from smoothcert.service.cli.train import add_commands
from smoothcert.worker.evaluation.analyze import analyze
from smoothcert.worker.evaluation.experiment import (
    ExperimentConfig,
    certified_accuracy_of_results,
    run_experiment,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_certified_accuracy_counts_right_classes_at_or_beyond_each_radius():
    results = [
        {"prediction": 1, "radius": 0.3},
        {"prediction": None, "radius": 0.0},
        {"prediction": 2, "radius": 0.9},
        {"prediction": 0, "radius": 0.5},
    ]
    shares = certified_accuracy_of_results(results, [1, 1, 2, 1], [0.0, 0.3, 0.5, 1.0])
    assert shares == [0.5, 0.5, 0.25, 0.0]


def test_experiment_writes_models_logs_table_and_plot(tmp_path):
    config = ExperimentConfig(
        methods=("gaussian", "smoothadv"),
        sigmas=(0.5,),
        epochs=1,
        m=2,
        n0=20,
        n=100,
        limit=12,
        radii=(0.0, 0.5, 1.0),
    )
    steps = []
    result = run_experiment(config, tmp_path, step=steps.append)
    assert steps == [
        "train gaussian σ=0.5",
        "certify gaussian σ=0.5",
        "train smoothadv σ=0.5",
        "certify smoothadv σ=0.5",
    ]
    assert [(r.method, r.sigma) for r in result.rows] == [("gaussian", 0.5), ("smoothadv", 0.5)]
    for row in result.rows:
        assert len(row.accuracy) == 3 and row.accuracy == sorted(row.accuracy, reverse=True)
        # the TSV logs are what `smoothcert analyze` reads, and agree with the table
        assert analyze([row.log_path], config.radii)["curves"][row.log_path] == pytest.approx(
            row.accuracy
        )
    table = (tmp_path / "certified_accuracy.md").read_text().splitlines()
    assert table[0] == "| method | σ | 0 | 0.5 | 1 |" and table[3].startswith(
        "| smoothadv | 0.5 | "
    )
    assert table[3].endswith("| – |")  # radius 1 is beyond the cap of n = 100 at σ = 0.5
    assert (tmp_path / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_size"] == 12 and summary["rows"][1]["training"]["method"] == "smoothadv"


def test_smoothcert_experiment_refuses_unknown_methods(tmp_path):
    parser = argparse.ArgumentParser(prog="smoothcert")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["experiment", "--methods", "gaussian,mixup", "--out-dir", str(tmp_path)]
    )
    with pytest.raises(
        ValueError, match="--methods: mixup; choose from gaussian, smoothed, smoothadv"
    ):
        args.handler(args)
