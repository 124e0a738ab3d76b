"""Training an ε-prediction diffusion model for one-step diffusion denoising (Carlini et al. 2023).

DDPM's objective (Ho et al. 2020) on images scaled to [−1, 1]: per image and step a timestep t
uniform over 0 … T−1 and ε ~ N(0, I), x_t = √ᾱ_t·x + √(1 − ᾱ_t)·ε, loss = MSE(ε̂(x_t, t), ε),
with the linear β schedule of :class:`~smoothcert.service.core.train_config.DiffusionConfig`.
The result is one self-describing ``diffusion_unet`` safetensors file (kind ``denoiser``, its
schedule ᾱ_t in ``extra.schedule``) that :func:`smoothcert.models.denoisers.load_denoiser` loads
and :func:`smoothcert.models.pipeline.compose` puts in front of a classifier. Every random draw
comes from one generator seeded per run; with a ``checkpoint_dir`` each finished epoch is saved
and a later call with the same configuration and data resumes to the same weights as an
uninterrupted run (:mod:`smoothcert.worker.training.checkpoints`). No Celery here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoothcert.models.architectures import build_denoiser, diffusion_levels
from smoothcert.models.denoisers import save_denoiser
from smoothcert.models.diffusion_schedule import linear_schedule, timestep_for_sigma
from smoothcert.models.metadata import DenoiserInfo, ModelError
from smoothcert.models.reproducible import init_weights
from smoothcert.service.core.train_config import DiffusionConfig, TrainingError
from smoothcert.worker.data.datasets import Dataset
from smoothcert.worker.training import checkpoints as ckpt
from smoothcert.worker.training.trainer import EVAL_BATCH, _derived_seed, _device

ARCH = "diffusion_unet"
EVAL_SIGMAS = (0.25, 0.5)  # the test split's one-step denoising error is measured at these σ


@dataclass
class DiffusionEpoch:
    """One finished epoch: the mean training loss, and on the test split (when there is one) the
    MSE of the one-step denoised D(x + δ) against x at each σ of :data:`EVAL_SIGMAS` the schedule
    reaches (keys ``"0.25"``, ``"0.5"``; the noisy input's own MSE is σ²)."""

    epoch: int  # 1-based
    epochs: int
    loss: float
    test_mse: dict[str, float] | None
    lr: float
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DiffusionResult:
    """The written file, its metadata, the trained network (eval mode, on the CPU) and the history."""

    path: Path
    info: DenoiserInfo
    network: nn.Module
    history: list[DiffusionEpoch]
    resumed_from: int = 0

    @property
    def metrics(self) -> dict[str, Any]:
        return self.info.extra["metrics"]


Progress = Callable[[DiffusionEpoch], None]


def train_diffusion(
    config: DiffusionConfig,
    dataset: Dataset,
    out: Path,
    *,
    checkpoint_dir: Path | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> DiffusionResult:
    """Train a ``diffusion_unet`` on ``dataset``'s training images and write it to ``out``.

    ``dataset`` is a :class:`~smoothcert.worker.data.datasets.Dataset` (as
    :func:`~smoothcert.worker.training.denoiser.train_denoiser` takes); its labels are not used,
    its test split (when there is one) is measured on after each epoch. The network's down-sampling
    levels follow the input (:func:`~smoothcert.models.architectures.diffusion_levels`).
    ``progress(epoch)`` runs after each epoch (and its checkpoint). TrainingError for a
    configuration, device or checkpoint that cannot be used.
    """
    started = time.perf_counter()
    run = _DiffusionRun(config, dataset, _device(device))
    identity = {
        **config.to_dict(),
        "kind": "diffusion",
        "dataset_sha256": dataset.sha256(),
        "levels": run.levels,
    }
    history = (
        []
        if checkpoint_dir is None
        else [
            DiffusionEpoch(**h)
            for h in ckpt.resume(
                checkpoint_dir, identity, run.network, run.optimizer, run.generator
            )
        ]
    )
    first = len(history)
    for epoch in range(first, config.epochs):
        tick = time.perf_counter()
        loss = run.epoch(epoch)
        metrics = DiffusionEpoch(
            epoch=epoch + 1,
            epochs=config.epochs,
            loss=loss,
            test_mse=run.evaluate(epoch),
            lr=config.lr_at(epoch),
            elapsed_s=time.perf_counter() - tick,
        )
        history.append(metrics)
        if checkpoint_dir is not None:
            ckpt.save_state(
                checkpoint_dir,
                ckpt.TrainingState(
                    epoch=epoch + 1,
                    model=run.network.state_dict(),
                    optimizer=run.optimizer.state_dict(),
                    generator=run.generator.get_state(),
                    identity=identity,
                    history=[h.to_dict() for h in history],
                ),
            )
        if progress is not None:
            progress(metrics)
    network = run.network.to("cpu").eval()
    info = _diffusion_info(config, dataset, run, identity, history, time.perf_counter() - started)
    path = save_denoiser(Path(out), network, info)
    return DiffusionResult(path, info, network, history, resumed_from=first)


class _DiffusionRun:
    """The mutable state of one diffusion training run."""

    def __init__(self, config: DiffusionConfig, data: Dataset, device: torch.device):
        self.config, self.device = config, device
        try:
            self.schedule = linear_schedule(config.timesteps, config.beta_start, config.beta_end)
        except ModelError as exc:
            raise TrainingError(str(exc)) from None
        self.alphas = torch.tensor(
            self.schedule["alphas_cumprod"], dtype=torch.float32, device=device
        )
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        _, height, width = data.input_shape
        self.levels = diffusion_levels(height, width)
        try:
            with torch.random.fork_rng(devices=[]):
                self.network = build_denoiser(
                    ARCH, data.input_shape[0], width=config.width, levels=self.levels
                )
        except ModelError as exc:
            raise TrainingError(str(exc)) from None
        self.network.to(device)
        init_weights(self.network, self.generator)
        self.x = torch.from_numpy(data.x).to(device)
        self.test = None if data.test_x is None else torch.from_numpy(data.test_x).to(device)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=config.lr)

    def epoch(self, epoch: int) -> float:
        """One pass over the training images; the mean loss."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr_at(epoch)
        self.network.train()
        order = torch.randperm(len(self.x), generator=self.generator, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for start in range(0, len(order), config.batch_size):
            x0 = 2.0 * self.x[order[start : start + config.batch_size]] - 1.0
            t = torch.randint(
                0, config.timesteps, (len(x0),), generator=self.generator, device=self.device
            )
            eps = torch.randn(x0.shape, generator=self.generator, device=self.device)
            alpha = self.alphas[t].view(-1, 1, 1, 1)
            x_t = alpha.sqrt() * x0 + (1.0 - alpha).sqrt() * eps
            loss = nn.functional.mse_loss(self.network(x_t, t), eps)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach().double() * len(x0)
        return float(loss_sum) / len(order)

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, float] | None:
        """The one-step denoising MSE on the test split at each reachable σ of EVAL_SIGMAS, one
        noise draw per image from a generator of its own; None without a test split."""
        if self.test is None:
            return None
        generator = torch.Generator(device=self.device).manual_seed(
            _derived_seed(self.config.seed, f"eval:{epoch}")
        )
        self.network.eval()
        found = {}
        for sigma in EVAL_SIGMAS:
            try:
                t = timestep_for_sigma(self.schedule["alphas_cumprod"], sigma)
            except ModelError:  # beyond a short schedule
                continue
            alpha = float(self.alphas[t])
            squared = 0.0
            for start in range(0, len(self.test), EVAL_BATCH):
                x = self.test[start : start + EVAL_BATCH]
                noisy = x + sigma * torch.randn(x.shape, generator=generator, device=self.device)
                x_t = alpha**0.5 * (2.0 * noisy - 1.0)
                steps = torch.full((len(x),), t, dtype=torch.int64, device=self.device)
                x0 = (x_t - (1.0 - alpha) ** 0.5 * self.network(x_t, steps)) / alpha**0.5
                squared += float((((x0 + 1.0) / 2.0).clamp(0.0, 1.0) - x).pow(2).sum())
            found[f"{sigma:g}"] = squared / self.test.numel()
        return found


def _diffusion_info(
    config: DiffusionConfig,
    data: Dataset,
    run: _DiffusionRun,
    identity: dict[str, Any],
    history: list[DiffusionEpoch],
    elapsed_s: float,
) -> DenoiserInfo:
    last = history[-1]
    training = {
        "objective": "ddpm-epsilon",
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "dataset": data.name,
        "dataset_sha256": identity["dataset_sha256"],
    }
    metrics = {
        "train_loss": last.loss,
        "test_mse": last.test_mse,
        "train_size": len(data.x),
        "test_size": None if data.test_x is None else len(data.test_x),
        "elapsed_s": elapsed_s,
    }
    return DenoiserInfo(
        format="safetensors",
        input_shape=data.input_shape,
        arch=ARCH,
        sigma=None,
        name=config.name or f"{data.name}-diffusion-T{config.timesteps}",
        extra={
            "width": config.width,
            "levels": run.levels,
            "prediction": "epsilon",
            "schedule": run.schedule,
            "training": training,
            "metrics": metrics,
            "history": [h.to_dict() for h in history],
        },
    )
