"""One-step diffusion denoising: σ → t against the linear schedule's closed form, the ε → x̂₀ step
on a network whose ε is known exactly, σ binding (unbound refusal, no mutation, provenance), the
safetensors round trip and the ONNX (x_t, t) form agreeing with torch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from smoothcert.models.architectures import build_denoiser
from smoothcert.models.base import bind_sigma
from smoothcert.models.denoisers import is_denoiser_file, load_denoiser, save_denoiser
from smoothcert.models.diffusion import (
    OnnxDiffusionDenoiser,
    TorchDiffusionDenoiser,
    export_diffusion_onnx,
)
from smoothcert.models.diffusion_schedule import largest_sigma, linear_schedule, timestep_for_sigma
from smoothcert.models.loaders import load_model
from smoothcert.models.metadata import DenoiserInfo, ModelError
from smoothcert.models.pipeline import compose
from smoothcert.models.reproducible import init_weights
from smoothcert.worker.smoothing import RunOptions, certify


def closed_form_alphas(
    timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> list[float]:
    """ᾱ_t = Π_{s<=t} (1 − β_s), β_s = beta_start + s·(beta_end − beta_start)/(T − 1), multiplied out in Python."""
    alphas, product = [], 1.0
    for s in range(timesteps):
        product *= 1.0 - (beta_start + s * (beta_end - beta_start) / (timesteps - 1))
        alphas.append(product)
    return alphas


def random_diffusion(
    path: Path,
    input_shape=(1, 8, 8),
    width: int = 8,
    timesteps: int = 100,
    seed: int = 0,
    scale: float = 0.3,
    name: str = "random-diffusion",
) -> Path:
    """A diffusion_unet of seeded random weights (times ``scale``) with a linear schedule of ``timesteps`` steps."""
    net = build_denoiser("diffusion_unet", input_shape[0], width=width, levels=1)
    init_weights(net, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    info = DenoiserInfo(
        format="safetensors",
        input_shape=tuple(input_shape),
        arch="diffusion_unet",
        name=name,
        extra={"width": width, "levels": 1, "schedule": linear_schedule(timesteps)},
    )
    return save_denoiser(path, net, info)


def test_sigma_maps_to_the_step_whose_noise_matches_2_sigma_in_the_closed_form():
    exact = closed_form_alphas(1000)
    schedule = linear_schedule(1000)["alphas_cumprod"]
    assert schedule == pytest.approx(exact, rel=1e-12, abs=0)
    ratios = [(1 - a) / a for a in exact]
    for t in (0, 1, 57, 258, 500, 999):  # σ whose (2σ)² is exactly step t's ratio gives t
        assert timestep_for_sigma(schedule, math.sqrt(ratios[t]) / 2) == t
    for sigma in np.linspace(0.01, 2.0, 97):  # any other σ: the nearest ratio, by brute force
        want = min(range(1000), key=lambda t: (abs(ratios[t] - (2 * sigma) ** 2), t))
        assert timestep_for_sigma(schedule, float(sigma)) == want
    assert timestep_for_sigma(schedule, 0.25) < timestep_for_sigma(schedule, 0.5)


def test_a_tie_goes_to_the_less_noisy_step():
    # ᾱ 0.5 twice (a flat stretch of schedule): two steps with ratio exactly 1 = (2·0.5)².
    assert timestep_for_sigma([0.9, 0.5, 0.5, 0.2], 0.5) == 1
    assert timestep_for_sigma([1.0, 0.5, 0.25], 0.5) == 1  # no tie: the step exactly at (2σ)² = 1


def test_sigma_beyond_the_last_step_is_refused_naming_the_largest_sigma_covered():
    schedule = linear_schedule(100)["alphas_cumprod"]
    exact = closed_form_alphas(100)
    largest = math.sqrt((1 - exact[-1]) / exact[-1]) / 2
    assert largest_sigma(schedule) == pytest.approx(largest, rel=1e-12)
    assert timestep_for_sigma(schedule, largest) == 99
    with pytest.raises(ModelError, match=rf"beyond .* schedule.*t = 99.*σ = {largest:.4g}"):
        timestep_for_sigma(schedule, largest * 1.01)
    for bad in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ModelError, match="σ > 0"):
            timestep_for_sigma(schedule, bad)
    with pytest.raises(ModelError, match="never increase"):
        timestep_for_sigma([0.5, 0.9], 0.1)


class OracleEps(torch.nn.Module):
    """ε̂(x_t, t) = (x_t − √ᾱ_t·(2x − 1))/√(1 − ᾱ_t) for one known clean batch x: the exact noise of x_t."""

    def __init__(self, clean: torch.Tensor, alphas: list[float]):
        super().__init__()
        self.register_buffer("signal", 2.0 * clean - 1.0)
        self.register_buffer("alphas", torch.tensor(alphas, dtype=torch.float64))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas[t].view(-1, 1, 1, 1).float()
        return (x_t - a.sqrt() * self.signal) / (1.0 - a).sqrt()


def test_one_step_with_the_exact_noise_gives_the_clean_image_back():
    schedule = linear_schedule(1000)["alphas_cumprod"]
    clean = torch.rand((8, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    info = DenoiserInfo(format="safetensors", input_shape=(1, 8, 8), arch="diffusion_unet")
    denoiser = TorchDiffusionDenoiser(OracleEps(clean, schedule), info, schedule)
    noisy = clean + 0.5 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ModelError, match="needs the noise level σ"):
        denoiser.denoise(noisy)
    bound = denoiser.for_sigma(0.5)
    assert denoiser.timestep is None and bound.timestep == timestep_for_sigma(
        schedule, 0.5
    )  # a new object
    assert torch.allclose(bound.denoise(noisy), clean, atol=1e-5)
    assert bound.sigma_binding["timestep"] == bound.timestep and bound.sigma_binding["sigma"] == 0.5


def test_a_saved_diffusion_denoiser_loads_back_and_is_not_a_classifier(tmp_path):
    path = random_diffusion(tmp_path / "d.safetensors")
    denoiser = load_denoiser(path, device="cpu")
    assert isinstance(denoiser, TorchDiffusionDenoiser) and denoiser.info.kind == "denoiser"
    assert (
        denoiser.info.extra["schedule"]["timesteps"] == 100 and denoiser.info.extra["levels"] == 1
    )
    assert np.array_equal(denoiser.alphas_cumprod, linear_schedule(100)["alphas_cumprod"])
    assert is_denoiser_file(path)
    with pytest.raises(ModelError, match="is a denoiser .* not a classifier"):
        load_model(path, device="cpu")
    out = denoiser.for_sigma(0.25).denoise(torch.rand((3, 1, 8, 8)))
    assert out.shape == (3, 1, 8, 8) and out.min() >= 0 and out.max() <= 1


def test_a_pipeline_binds_sigma_per_run_and_its_provenance_names_the_timestep(
    tmp_path, demo_paths, digits_test_set
):
    path = random_diffusion(tmp_path / "d.safetensors")
    pipeline = compose(
        load_denoiser(path, device="cpu"), load_model(demo_paths["safetensors"], device="cpu")
    )
    x = digits_test_set[0][:3].numpy()
    with pytest.raises(ModelError, match="needs the noise level σ"):
        pipeline.logits(torch.from_numpy(x))
    schedule = pipeline.denoiser.alphas_cumprod
    for sigma in (0.25, 0.5):
        run = certify(
            pipeline, x, sigma, n0=10, n=50, alpha=0.01, options=RunOptions(batch_size=60, seed=3)
        )
        part = run.provenance["model_parts"]["denoiser"]
        assert (part["sigma"], part["timestep"]) == (sigma, timestep_for_sigma(schedule, sigma))
        assert part["sha256"] == pipeline.denoiser.info.sha256
    assert (
        pipeline.denoiser.timestep is None and "timestep" not in pipeline.info.parts["denoiser"]
    )  # untouched
    assert bind_sigma(pipeline, 0.5).info.sha256 == pipeline.info.sha256
    with pytest.raises(ModelError, match=rf"σ = 1 is beyond .* σ = {largest_sigma(schedule):.4g}"):
        certify(pipeline, x, 1.0, n0=10, n=50, alpha=0.01, options=RunOptions(seed=3))


def test_the_onnx_form_denoises_and_certifies_as_the_torch_model_does(
    tmp_path, demo_paths, digits_test_set
):
    """Outputs within 1e-4 on a fixed noisy batch, and the same certified rows. The rows could only
    differ if some noisy copy's scores were within float rounding of a tie: not seen on these seeds."""
    torch_denoiser = load_denoiser(random_diffusion(tmp_path / "d.safetensors"), device="cpu")
    onnx_path = export_diffusion_onnx(torch_denoiser, tmp_path / "d.onnx")
    assert is_denoiser_file(onnx_path) and not is_denoiser_file(demo_paths["onnx"])
    onnx_denoiser = load_denoiser(onnx_path, device="cpu")
    assert isinstance(onnx_denoiser, OnnxDiffusionDenoiser) and onnx_denoiser.info.format == "onnx"
    assert np.array_equal(onnx_denoiser.alphas_cumprod, torch_denoiser.alphas_cumprod)
    with pytest.raises(ModelError, match="is a denoiser .* not a classifier"):
        load_model(onnx_path, device="cpu")
    clean = digits_test_set[0][:16]
    noisy = clean + 0.5 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(4))
    a, b = torch_denoiser.for_sigma(0.5).denoise(noisy), onnx_denoiser.for_sigma(0.5).denoise(noisy)
    assert float((a - b).abs().max()) < 1e-4
    classifier = load_model(demo_paths["safetensors"], device="cpu")
    x = clean[:4].numpy()
    runs = [
        certify(
            compose(d, classifier),
            x,
            0.5,
            n0=20,
            n=100,
            alpha=0.01,
            options=RunOptions(batch_size=120, seed=9),
        )
        for d in (torch_denoiser, onnx_denoiser)
    ]
    rows = [[(r.prediction, r.n_a, r.radius) for r in run.results] for run in runs]
    assert rows[0] == rows[1]
    assert runs[1].provenance["model_parts"]["denoiser"]["format"] == "onnx"
