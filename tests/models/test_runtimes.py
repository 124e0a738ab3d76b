"""Runtime choice (models/runtimes.py): the export agrees with torch, auto measures once, pins are kept."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from smoothcert.models.architectures import DEFAULT_INPUT_SHAPE, build_network
from smoothcert.models.base import Normalize, TorchClassifier
from smoothcert.models.denoisers import load_denoiser
from smoothcert.models.loaders import load_model
from smoothcert.models.metadata import ModelError, ModelInfo, Normalization
from smoothcert.models.pipeline import load_pipeline
from smoothcert.models.runtimes import (
    CANDIDATES,
    CHOICES_FILE,
    DENOISER_AGREEMENT_ATOL,
    batch_class,
    check_denoiser_agreement,
    onnx_denoiser,
    select_denoiser_runtime,
    select_runtime,
)
from smoothcert.worker.smoothing import RunOptions, certify
from tests.support.denoisers import random_denoiser


def _random_torch_model(arch: str) -> TorchClassifier:
    torch.manual_seed(0)
    shape = DEFAULT_INPUT_SHAPE[arch]
    norm = Normalization(mean=(0.5,) * shape[0], std=(0.25,) * shape[0])
    module = torch.nn.Sequential(Normalize(norm, shape[0]), build_network(arch, 10)).eval()
    info = ModelInfo(
        format="safetensors", input_shape=shape, num_classes=10, arch=arch, sha256="0" * 64
    )
    return TorchClassifier(module, info, "cpu")


@pytest.mark.parametrize("arch", ["digits_cnn", "cifar_resnet20"])
def test_the_onnx_export_gives_the_labels_of_the_torch_model(arch, demo_paths, tmp_path):
    # digits_cnn: the trained demo model; cifar_resnet20: random weights of seed 0 (BatchNorm folded
    # by the exporter, so its arithmetic is not the same as torch's). Deterministic: no failure rate.
    model = (
        load_model(demo_paths["safetensors"], device="cpu")
        if arch == "digits_cnn"
        else _random_torch_model(arch)
    )
    exported = select_runtime(model, "onnxruntime", batch_size=64, cache_dir=tmp_path)
    assert exported.runtime == "onnxruntime" and exported.provider == "CPUExecutionProvider"
    assert (
        exported.info.sha256 == model.info.sha256
        and len(exported.runtime_choice["graph_sha256"]) == 64
    )
    generator = torch.Generator().manual_seed(1)
    clean = torch.rand((200, *model.info.input_shape), generator=generator)
    batch = clean + 0.25 * torch.randn(clean.shape, generator=generator)
    assert torch.equal(exported.classify(batch), model.classify(batch))


def test_auto_measures_once_records_the_choice_and_reads_the_cache_the_second_time(
    demo_paths, tmp_path, caplog
):
    model = load_model(demo_paths["safetensors"], device="cpu")
    caplog.set_level(logging.INFO, logger="smoothcert.models.runtimes")
    first = select_runtime(model, "auto", batch_size=1000, cache_dir=tmp_path)
    choice = first.runtime_choice
    assert choice["how"] == "auto, measured" and choice["chosen"] in CANDIDATES
    assert set(choice["measured_samples_per_s"]) == set(CANDIDATES)  # none failed on the demo model
    assert first.runtime == ("onnxruntime" if choice["chosen"] == "onnxruntime" else "torch")
    written = (tmp_path / CHOICES_FILE).read_bytes()
    assert f"{model.info.sha256}|cpu|batch<={batch_class(1000)}".encode() in written
    assert "measured" in caplog.text
    caplog.clear()
    # A batch of the same size class: the cached choice, no second measurement (the file is unchanged).
    second = select_runtime(model, "auto", batch_size=900, cache_dir=tmp_path)
    assert second.runtime_choice["how"] == "auto, from the cache"
    assert second.runtime_choice["chosen"] == choice["chosen"] and second.runtime == first.runtime
    assert (tmp_path / CHOICES_FILE).read_bytes() == written
    assert "from the cache" in caplog.text and "measured" not in caplog.text
    # The choice sits on a copy: the loaded model keeps no trace of it.
    assert not hasattr(model, "runtime_choice")


def test_pinned_runtimes_are_honoured_and_torch_is_refused_for_an_onnx_model(demo_paths, tmp_path):
    safetensors = load_model(demo_paths["safetensors"], device="cpu")
    pinned = select_runtime(safetensors, "torch", batch_size=64, cache_dir=tmp_path)
    assert pinned.runtime == "torch" and pinned.runtime_choice == {
        "requested": "torch",
        "chosen": "torch",
        "how": "pinned",
    }
    assert (
        select_runtime(safetensors, "onnxruntime", batch_size=64, cache_dir=tmp_path).runtime
        == "onnxruntime"
    )
    assert not (tmp_path / CHOICES_FILE).exists()  # a pinned runtime measures and records nothing
    onnx = load_model(demo_paths["onnx"], device="cpu")
    assert (
        select_runtime(onnx, "auto", batch_size=64, cache_dir=tmp_path).runtime_choice["chosen"]
        == "onnxruntime"
    )
    with pytest.raises(
        ModelError,
        match="runtime torch needs a safetensors model; an ONNX model .* onnxruntime only",
    ):
        select_runtime(onnx, "torch", batch_size=64, cache_dir=tmp_path)
    with pytest.raises(
        ModelError, match="unknown runtime 'tensorrt'; use one of auto, torch, onnxruntime"
    ):
        select_runtime(safetensors, "tensorrt", batch_size=64, cache_dir=tmp_path)


def test_bfloat16_runs_in_torch_casting_the_float32_noise_and_is_recorded(demo_paths, tmp_path):
    model = load_model(demo_paths["safetensors"], device="cpu")
    reduced = select_runtime(model, "auto", batch_size=64, cache_dir=tmp_path, precision="bfloat16")
    assert reduced.runtime == "torch" and reduced.precision == "bfloat16"
    assert reduced.runtime_choice == {
        "requested": "auto",
        "chosen": "torch",
        "how": "precision bfloat16: torch",
    }
    assert next(reduced.module.parameters()).dtype == torch.bfloat16
    assert next(model.module.parameters()).dtype == torch.float32  # the loaded model is untouched
    generator = torch.Generator().manual_seed(2)
    clean = torch.rand((200, 1, 8, 8), generator=generator)
    batch = clean + 0.25 * torch.randn(clean.shape, generator=generator)
    scores = reduced.logits(batch)
    assert scores.dtype == torch.float32 and scores.shape == (200, 10)
    # Another classifier, the same one nearly everywhere (fixed seed: deterministic, no failure rate).
    assert (reduced.classify(batch) == model.classify(batch)).float().mean() >= 0.9


@pytest.mark.parametrize(
    "fmt, runtime, precision, message",
    [
        (
            "safetensors",
            "auto",
            "float16",
            "precision float16 needs a CUDA device, not cpu; use float32",
        ),
        ("safetensors", "onnxruntime", "bfloat16", "precision bfloat16 runs in torch only"),
        ("onnx", "auto", "bfloat16", "precision bfloat16 runs in torch only"),
        (
            "safetensors",
            "auto",
            "int8",
            "unknown precision 'int8'; use one of float32, float16, bfloat16",
        ),
    ],
)
def test_a_precision_the_runtime_or_device_cannot_run_is_refused(
    demo_paths, tmp_path, fmt, runtime, precision, message
):
    model = load_model(demo_paths[fmt], device="cpu")
    with pytest.raises(ModelError, match=message):
        select_runtime(model, runtime, batch_size=64, cache_dir=tmp_path, precision=precision)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
def test_on_cuda_every_precision_runs_and_auto_considers_the_compiled_model(
    demo_paths, tmp_path, precision
):
    model = load_model(demo_paths["safetensors"], device="cuda")
    chosen = select_runtime(model, "auto", batch_size=4096, cache_dir=tmp_path, precision=precision)
    assert chosen.device.type == "cuda" and chosen.precision == precision
    if precision == "float32":
        assert "torch-compiled" in chosen.runtime_choice["measured_samples_per_s"]
        onnx = select_runtime(model, "onnxruntime", batch_size=4096, cache_dir=tmp_path)
        assert onnx.provider == "CUDAExecutionProvider" and onnx.device.type == "cuda"
        x = torch.rand((64, 1, 8, 8), device="cuda")
        assert onnx.logits(x).device.type == "cuda"  # I/O binding: the scores stay on the device


def _pipeline(demo_paths, tmp_path, **size):
    return load_pipeline(
        random_denoiser(tmp_path / "dncnn.safetensors", **size),
        demo_paths["safetensors"],
        device="cpu",
    )


def test_a_pipelines_dncnn_gets_its_runtime_by_measurement_checked_cached_and_recorded(
    demo_paths, tmp_path
):
    pipeline = _pipeline(demo_paths, tmp_path)
    first = select_runtime(pipeline, "auto", batch_size=1000, cache_dir=tmp_path / "cache")
    choice = first.runtime_choice
    assert choice["how"] == "auto, per part" and choice["chosen"] == first.runtime
    denoiser, classifier = choice["parts"]["denoiser"], choice["parts"]["classifier"]
    assert denoiser["how"] == classifier["how"] == "auto, measured"
    assert set(denoiser["measured_samples_per_s"]) == {
        "torch",
        "onnxruntime",
    }  # the export built and agreed
    assert (
        first.denoiser.runtime == denoiser["chosen"]
        and first.classifier.runtime_choice == classifier
    )
    assert first.info.sha256 == pipeline.info.sha256 and not hasattr(pipeline, "runtime_choice")
    second = select_runtime(pipeline, "auto", batch_size=1000, cache_dir=tmp_path / "cache")
    assert second.runtime_choice["parts"]["denoiser"]["how"] == "auto, from the cache"
    assert second.runtime_choice["parts"]["denoiser"]["chosen"] == denoiser["chosen"]
    # The export's images are torch's within the agreement tolerance on noisy inputs too.
    exported = onnx_denoiser(pipeline.denoiser, tmp_path / "cache")
    generator = torch.Generator().manual_seed(1)
    noisy = torch.rand((200, 1, 8, 8), generator=generator) + 0.5 * torch.randn(
        (200, 1, 8, 8), generator=generator
    )
    assert (
        float((exported.denoise(noisy) - pipeline.denoiser.denoise(noisy)).abs().max())
        <= DENOISER_AGREEMENT_ATOL
    )
    # Every result names the runtime of both parts.
    run = certify(
        first,
        torch.rand((2, 1, 8, 8), generator=generator),
        0.25,
        n0=10,
        n=50,
        options=RunOptions(seed=0),
    )
    assert run.provenance["runtime_choice"]["parts"]["denoiser"]["chosen"] == denoiser["chosen"]
    assert (
        run.provenance["runtime"] == first.runtime
        and run.provenance["model_sha256"] == pipeline.info.sha256
    )


def test_a_denoiser_export_that_changes_the_images_is_refused_and_other_denoisers_stay_in_torch(
    tmp_path,
):
    reference = load_denoiser(random_denoiser(tmp_path / "a.safetensors", seed=0), device="cpu")
    other = load_denoiser(random_denoiser(tmp_path / "b.safetensors", seed=1), device="cpu")
    with pytest.raises(
        ModelError,
        match="export of the denoiser disagrees with torch on the .*pixels differ by up to",
    ):
        check_denoiser_agreement(reference, other)
    check_denoiser_agreement(reference, reference)
    reference.info = dataclasses.replace(reference.info, arch="not-exportable")
    kept = select_denoiser_runtime(reference, batch_size=100, cache_dir=tmp_path / "cache")
    assert (
        kept.runtime == "torch"
        and kept.runtime_choice["how"] == "auto, the only runtime of this denoiser"
    )
    assert not (tmp_path / "cache" / "exports").exists()
