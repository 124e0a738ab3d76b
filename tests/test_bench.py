"""The benchmarks stay runnable: bench/gpu.py's CPU-safe part (--dry-run) and bench/users.py's options."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu, users

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_dry_run_builds_both_networks_and_prints_every_row(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, check=True).stdout.splitlines()
    assert out[0].startswith("cifar_resnet110: 1,730,714 parameters, input [3, 32, 32], n = 100,000")
    assert out[1].startswith("imagenet_resnet50: 25,557,032 parameters, input [3, 224, 224], n = 10,000")
    # 4 runtimes x 3 precisions per model, less onnxruntime's two reduced precisions
    assert out[2:] == [f"would run {m} {r} {p}" for m, r, p in gpu.plan(list(gpu.PLAN))]
    assert len(out[2:]) == 2 * (4 * 3 - 2)


def test_the_benchmarks_refuse_unknown_models_naming_the_known_ones(capsys):
    for module in (gpu, users):
        with pytest.raises(SystemExit):
            module._parse(["--models", "vgg16"])
        assert "unknown models vgg16; use some of" in capsys.readouterr().err
    assert users._parse([]).models == ["digits_cnn", "cifar_resnet20", "imagenet_resnet50"]
