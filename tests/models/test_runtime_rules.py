"""Tests for smoothcert.models.runtime_rules: the one rule of runtime, precision and device, in the
API's words and in a loaded model's."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from smoothcert.models.runtime_rules import (
    PRECISIONS,
    RUNTIMES,
    loaded_model_refusal,
    runtime_refusal,
)

FORMATS = ("safetensors", "onnx", "pipeline")
DEVICES = ("auto", "cpu", "cuda", "cuda:1", "mps")


@pytest.mark.parametrize(
    "fmt, runtime, precision, device",
    [
        ("safetensors", "auto", "float32", "cpu"),
        ("safetensors", "torch", "bfloat16", "cpu"),
        ("safetensors", "auto", "float16", "cuda"),
        ("safetensors", "torch", "float16", "cuda:1"),
        ("safetensors", "auto", "float16", "auto"),  # the worker's device decides
        ("safetensors", "onnxruntime", "float32", "cpu"),
        ("onnx", "auto", "float32", "cpu"),
        ("onnx", "onnxruntime", "float32", "cuda"),
        ("pipeline", "auto", "float32", "cpu"),
    ],
)
def test_what_runs_is_refused_by_neither(fmt, runtime, precision, device):
    assert runtime_refusal(fmt, runtime, precision, device, "m1") is None
    assert loaded_model_refusal(fmt, runtime, precision, device) is None


@pytest.mark.parametrize(
    "fmt, runtime, precision, device, message",
    [
        (
            "pipeline",
            "torch",
            "float32",
            "cpu",
            "model m1 is a pipeline, whose parts each run in their own loader: "
            "runtime auto and precision float32 only",
        ),
        (
            "pipeline",
            "auto",
            "bfloat16",
            "cpu",
            "model m1 is a pipeline, whose parts each run in their own loader: "
            "runtime auto and precision float32 only",
        ),
        (
            "onnx",
            "torch",
            "float32",
            "cpu",
            "runtime torch needs a safetensors model; model m1 is ONNX, which runs "
            "in onnxruntime only: use runtime auto or onnxruntime",
        ),
        (
            "safetensors",
            "onnxruntime",
            "bfloat16",
            "cpu",
            "precision bfloat16 runs in torch only (a safetensors model, runtime auto or "
            "torch); onnxruntime evaluates the float32 graph",
        ),
        (
            "onnx",
            "auto",
            "float16",
            "cuda",
            "precision float16 runs in torch only (a safetensors model, runtime auto or "
            "torch); onnxruntime evaluates the float32 graph",
        ),
        (
            "safetensors",
            "auto",
            "float16",
            "cpu",
            "precision float16 needs a CUDA device and this server's workers run on the CPU "
            "(SMOOTHCERT_DEVICE=cpu); use float32, or bfloat16",
        ),
        (
            "safetensors",
            "torch",
            "float16",
            "mps",
            "precision float16 needs a CUDA device and this server's workers run on mps "
            "(SMOOTHCERT_DEVICE=mps); use float32, or bfloat16",
        ),
        (
            "safetensors",
            "tensorrt",
            "float32",
            "cpu",
            "unknown runtime 'tensorrt'; use one of auto, torch, onnxruntime",
        ),
        (
            "safetensors",
            "auto",
            "int8",
            "cpu",
            "unknown precision 'int8'; use one of float32, float16, bfloat16",
        ),
    ],
)
def test_the_api_refuses_in_the_words_of_a_stored_model(fmt, runtime, precision, device, message):
    assert runtime_refusal(fmt, runtime, precision, device, "m1") == message


@pytest.mark.parametrize(
    "fmt, runtime, precision, device, message",
    [
        (
            "pipeline",
            "onnxruntime",
            "float32",
            "cpu",
            "a pipeline runs each part (denoiser, classifier) in its own runtime: runtime auto "
            "and precision float32 only",
        ),
        (
            "onnx",
            "torch",
            "float32",
            "cpu",
            "runtime torch needs a safetensors model; an ONNX model is its own graph and runs "
            "in onnxruntime only (use runtime auto or onnxruntime)",
        ),
        (
            "onnx",
            "auto",
            "bfloat16",
            "cpu",
            "precision bfloat16 runs in torch only (a safetensors model, runtime auto or "
            "torch); onnxruntime evaluates the float32 graph",
        ),
        (
            "safetensors",
            "auto",
            "float16",
            "cpu",
            "precision float16 needs a CUDA device, not cpu; use float32 "
            "(or bfloat16, which torch runs on a CPU)",
        ),
    ],
)
def test_a_loaded_model_is_refused_in_its_own_words(fmt, runtime, precision, device, message):
    assert loaded_model_refusal(fmt, runtime, precision, device) == message


def test_both_wordings_refuse_exactly_the_same_requests():
    for fmt, runtime, precision, device in itertools.product(
        FORMATS, (*RUNTIMES, "tensorrt"), (*PRECISIONS, "int8"), DEVICES
    ):
        api = runtime_refusal(fmt, runtime, precision, device, "m1")
        loaded = loaded_model_refusal(fmt, runtime, precision, device)
        assert (api is None) == (loaded is None), (fmt, runtime, precision, device)


def test_a_pipeline_is_refused_as_a_pipeline_before_any_other_rule():
    assert "is a pipeline" in runtime_refusal("pipeline", "torch", "float16", "cpu", "p1")
    assert "a pipeline runs" in loaded_model_refusal("pipeline", "onnxruntime", "bfloat16", "cpu")


@pytest.mark.process
def test_the_rules_import_no_torch():
    code = (
        "import sys, smoothcert.models.runtime_rules; "
        "assert not {'torch', 'onnxruntime', 'numpy'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("runtime, precision", [("onnxruntime", "float32"), ("auto", "bfloat16")])
def test_select_runtime_refuses_a_pinned_pipeline_by_the_same_rule(
    demo_paths, tmp_path, runtime, precision
):
    from smoothcert.models.metadata import ModelError
    from smoothcert.models.pipeline import load_pipeline
    from smoothcert.models.runtimes import select_runtime
    from tests.support.denoisers import random_denoiser

    pipeline = load_pipeline(
        random_denoiser(tmp_path / "dncnn.safetensors"), demo_paths["safetensors"], device="cpu"
    )
    with pytest.raises(ModelError, match="a pipeline runs each part"):
        select_runtime(pipeline, runtime, batch_size=64, cache_dir=tmp_path, precision=precision)
