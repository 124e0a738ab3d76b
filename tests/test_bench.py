"""The benchmarks stay runnable: bench/gpu.py's CPU-safe part (--dry-run) and bench/users.py's options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu, users

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.process
def test_the_gpu_benchmark_dry_run_builds_both_networks_and_prints_every_row(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout.splitlines()
    assert out[0].startswith(
        "cifar_resnet110: 1,730,714 parameters, input [3, 32, 32], n = 100,000"
    )
    assert out[1].startswith(
        "imagenet_resnet50: 25,557,032 parameters, input [3, 224, 224], n = 10,000"
    )
    # 4 runtimes x 3 precisions per model, less onnxruntime's two reduced precisions
    assert out[2:] == [f"would run {m} {r} {p}" for m, r, p in gpu.plan(list(gpu.PLAN))]
    assert len(out[2:]) == 2 * (4 * 3 - 2)


def test_the_benchmarks_refuse_unknown_models_naming_the_known_ones(capsys):
    for module in (gpu, users):
        with pytest.raises(SystemExit):
            module._parse(["--models", "vgg16"])
        assert "unknown models vgg16; use some of" in capsys.readouterr().err
    assert users._parse([]).models == ["digits_cnn", "cifar_resnet20", "imagenet_resnet50"]


def test_a_path_is_compared_with_the_raw_runs_around_it_and_a_part_alone_with_nothing():
    rows = [
        {"model": "m", "path": "raw onnxruntime", "runtime": "onnxruntime", "samples_per_s": 100.0},
        {
            "model": "m",
            "path": "cli onnx",
            "runtime": "torch",
            "samples_per_s": 90.0,
            "raw_around": {"onnxruntime": [80.0, 120.0], "torch": [60.0, 60.0]},
        },
        {
            "model": "m",
            "path": "denoiser alone, torch",
            "runtime": "torch",
            "samples_per_s": 300.0,
            "part": "denoiser",
        },
    ]
    users._ratios(rows)
    assert rows[0]["vs_fastest_raw"] == 1.0
    # the fastest runtime's mean of the runs before and after (100), the spread over each, its own runtime's
    assert rows[1]["vs_fastest_raw"] == pytest.approx(0.9) and rows[1]["vs_raw_spread"] == (
        0.75,
        1.125,
    )
    assert rows[1]["vs_own_raw"] == pytest.approx(1.5)
    assert rows[2]["vs_fastest_raw"] is None
    assert users._parse(["--no-pipeline", "--no-service"]).pipeline is False
