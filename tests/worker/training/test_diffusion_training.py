"""Diffusion training on tiny problems: the DDPM loss falls, a killed run resumes to the same
weights, and `train-diffusion` writes a file (and its ONNX form) that `certify --denoiser` takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smoothcert.models.denoisers import load_denoiser
from smoothcert.models.diffusion import OnnxDiffusionDenoiser, TorchDiffusionDenoiser
from smoothcert.models.loaders import load_model
from smoothcert.models.pipeline import compose
from smoothcert.service.cli.main import main
from smoothcert.service.core.train_config import DiffusionConfig, TrainingError
from smoothcert.worker.training import checkpoints as training_checkpoint
from smoothcert.worker.training.diffusion import train_diffusion
from tests.worker.training.test_training import Killed

pytestmark = pytest.mark.usefixtures("one_thread")


def small(**overrides) -> DiffusionConfig:
    return DiffusionConfig(
        **{**dict(epochs=3, batch_size=16, lr=3e-3, timesteps=100, width=8, seed=2), **overrides}
    )


def test_the_ddpm_loss_falls_and_the_file_is_a_diffusion_denoiser(tiny, tmp_path, demo_paths):
    result = train_diffusion(small(epochs=4), tiny, tmp_path / "d.safetensors")
    losses = [h.loss for h in result.history]
    # At initialization ε̂ is near 0 and the loss near E[ε²] = 1; a network that learned nothing stays there.
    assert losses[-1] < 0.8 * losses[0] and losses[-1] < 0.7
    assert set(result.history[-1].test_mse) == {"0.25", "0.5"}  # T = 100 reaches σ = 0.5
    denoiser = load_denoiser(result.path, device="cpu")
    assert (
        isinstance(denoiser, TorchDiffusionDenoiser)
        and denoiser.info.extra["schedule"]["timesteps"] == 100
    )
    for key, value in result.network.state_dict().items():
        assert torch.equal(denoiser.module.state_dict()[key], value), key
    compose(
        denoiser, load_model(demo_paths["safetensors"], device="cpu")
    )  # registers: checked at σ 0.25


def test_a_killed_run_resumes_to_the_same_weights(tiny, tmp_path):
    config = small()
    uninterrupted = train_diffusion(config, tiny, tmp_path / "whole.safetensors")

    def kill_after_epoch_2(metrics):
        if metrics.epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train_diffusion(
            config,
            tiny,
            tmp_path / "part.safetensors",
            progress=kill_after_epoch_2,
            checkpoint_dir=tmp_path / "ck",
        )
    assert (
        training_checkpoint.load_state(tmp_path / "ck").epoch == 2
        and not (tmp_path / "part.safetensors").exists()
    )
    seen = []
    resumed = train_diffusion(
        config,
        tiny,
        tmp_path / "part.safetensors",
        progress=lambda m: seen.append(m.epoch),
        checkpoint_dir=tmp_path / "ck",
    )
    assert resumed.resumed_from == 2 and seen == [3]
    expected = uninterrupted.network.state_dict()
    for key, value in resumed.network.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert [h.loss for h in resumed.history] == [h.loss for h in uninterrupted.history]
    with pytest.raises(TrainingError, match="belongs to another run"):
        train_diffusion(
            small(seed=3), tiny, tmp_path / "other.safetensors", checkpoint_dir=tmp_path / "ck"
        )


def test_cli_trains_a_diffusion_model_that_certify_denoiser_takes(
    tiny, tmp_path, capsys, demo_paths
):
    data, out, onnx = tmp_path / "strokes.npz", tmp_path / "d.safetensors", tmp_path / "d.onnx"
    np.savez(data, x=tiny.x, y=tiny.y)
    assert (
        main(
            [
                "train-diffusion",
                "--dataset",
                str(data),
                "--epochs",
                "1",
                "--timesteps",
                "100",
                "--width",
                "8",
                "--batch-size",
                "32",
                "--seed",
                "1",
                "--out",
                str(out),
                "--onnx",
                str(onnx),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.split() == [str(out), str(onnx)]
    assert isinstance(load_denoiser(onnx, device="cpu"), OnnxDiffusionDenoiser)
    x = tmp_path / "x.npy"
    np.save(x, tiny.x[:2])
    for denoiser in (out, onnx):
        assert (
            main(
                [
                    "certify",
                    str(demo_paths["safetensors"]),
                    "--denoiser",
                    str(denoiser),
                    "--inputs",
                    str(x),
                    "--sigma",
                    "0.5",
                    "--n0",
                    "10",
                    "--n",
                    "50",
                    "--seed",
                    "1",
                ]
            )
            == 0
        )
        assert capsys.readouterr().out.startswith("idx\t")
    code = main(
        [
            "certify",
            str(demo_paths["safetensors"]),
            "--denoiser",
            str(out),
            "--inputs",
            str(x),
            "--sigma",
            "2",
            "--n0",
            "10",
            "--n",
            "50",
            "--seed",
            "1",
        ]
    )
    assert code != 0 and "beyond this diffusion model's schedule" in capsys.readouterr().err
