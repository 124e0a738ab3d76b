"""`smoothcert certify --runtime`: auto by default and cached, pinned on request, torch refused for ONNX."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from smoothcert.models.runtimes import CHOICES_FILE
from smoothcert.service.cli.main import cache_dir, main


def _certify(demo_paths, tmp_path, *extra: str) -> int:
    x = tmp_path / "x.npy"
    np.save(x, np.load(demo_paths["test_x"])[:2])
    return main(
        [
            "certify",
            str(demo_paths["safetensors"]),
            "--inputs",
            str(x),
            "--sigma",
            "0.25",
            "--n0",
            "10",
            "--n",
            "100",
            "--seed",
            "0",
            "--out",
            str(tmp_path / "r.tsv"),
            *extra,
        ]
    )


def test_auto_is_the_default_measured_once_then_read_from_the_cli_cache(
    demo_paths, tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache" / "smoothcert"
    hows = []
    for _ in range(2):
        assert _certify(demo_paths, tmp_path) == 0
        hows.append(json.loads((tmp_path / "r.tsv.json").read_text())["runtime_choice"]["how"])
    assert hows == ["auto, measured", "auto, from the cache"]
    assert (cache_dir() / CHOICES_FILE).is_file()


def test_a_pinned_runtime_is_recorded(demo_paths, tmp_path):
    assert _certify(demo_paths, tmp_path, "--runtime", "onnxruntime") == 0
    provenance = json.loads((tmp_path / "r.tsv.json").read_text())
    assert (
        provenance["runtime"] == "onnxruntime" and provenance["runtime_choice"]["how"] == "pinned"
    )
    assert Path(os.environ["XDG_CACHE_HOME"]) in cache_dir().parents


def test_runtime_torch_on_an_onnx_file_is_an_error_that_says_why(demo_paths, tmp_path, capsys):
    code = main(
        [
            "certify",
            str(demo_paths["onnx"]),
            "--inputs",
            str(demo_paths["test_x"]),
            "--sigma",
            "0.25",
            "--n",
            "100",
            "--runtime",
            "torch",
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "smoothcert: error: runtime torch needs a safetensors model; an ONNX model is its own graph and runs in "
        "onnxruntime only (use runtime auto or onnxruntime)"
    )


def test_float16_on_the_cpu_is_an_error_and_bfloat16_is_recorded(demo_paths, tmp_path, capsys):
    assert _certify(demo_paths, tmp_path, "--device", "cpu", "--precision", "float16") == 2
    assert "precision float16 needs a CUDA device, not cpu" in capsys.readouterr().err
    assert _certify(demo_paths, tmp_path, "--device", "cpu", "--precision", "bfloat16") == 0
    assert json.loads((tmp_path / "r.tsv.json").read_text())["precision"] == "bfloat16"
