"""Training base classifiers that smooth well: Gaussian augmentation, the smoothed soft loss, SmoothAdv.

Three recipes, all with the noise added in [0,1] pixel space *before* the model's normalization
layer and never clamped, exactly as at certification (and ``standard``, plain cross-entropy on
clean images, the baseline that a denoiser is put in front of):

- ``gaussian`` (Cohen et al. 2019): cross-entropy of f(x+η), η ~ N(0, σ²I), one copy per image.
- ``smoothed``: the plug-in smoothed soft loss −log((1/m) Σᵢ softmax(f(x+ηᵢ))_y) over m copies.
- ``smoothadv`` (Salman et al. 2019): an ℓ₂ PGD attack on that smoothed loss finds one δ per
  image (shared by its m copies, ‖δ‖₂ ≤ ε, x+δ in [0,1]), then cross-entropy on the m copies
  x+δ+ηᵢ. ε grows linearly over the first ``warmup_epochs`` epochs.

Every random draw (initial weights, shuffling, noise) comes from one generator seeded per job,
never the global one. With a ``checkpoint_dir`` the state after each epoch is saved there and a
later call with the same configuration and data resumes from it, ending with the same weights as
an uninterrupted run. No Celery here: the CLI, the worker task and the tests call :func:`train`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from smoothcert.models.architectures import build_network
from smoothcert.models.base import Normalize
from smoothcert.models.loaders import resolve_device
from smoothcert.models.metadata import ModelError, ModelInfo, Normalization
from smoothcert.models.reproducible import init_weights
from smoothcert.models.safetensors_io import save_safetensors_model
from smoothcert.service.core.train_config import METHODS, OPTIMIZERS, TrainConfig, TrainingError  # noqa: F401
from smoothcert.worker.data.datasets import Dataset
from smoothcert.worker.smoothing.sampling import Canceled
from smoothcert.worker.training import checkpoints as ckpt
from smoothcert.worker.training.attacks import noisy_logits, pgd_l2_smoothed, smoothed_soft_loss

SGD_MOMENTUM, SGD_WEIGHT_DECAY = 0.9, 1e-4  # Cohen et al.'s values
EVAL_BATCH = 1024


@dataclass
class EpochMetrics:
    """One finished epoch, as passed to the progress callback.

    ``noisy_accuracy`` is the base classifier's accuracy on the noisy copies it trained on in the
    epoch (for smoothadv: the attacked copies); ``test_noisy_accuracy`` is its accuracy on one
    noisy copy of each held-out image, when the dataset has a test split.
    """

    epoch: int  # 1-based
    epochs: int
    loss: float
    noisy_accuracy: float
    test_noisy_accuracy: float | None
    lr: float
    epsilon: float | None  # smoothadv only
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """The trained network (bare architecture, no normalization layer, eval mode, on the CPU),
    its self-describing metadata and the per-epoch history. ``resumed_from`` is the number of
    epochs a checkpoint had already finished (0 for a fresh run)."""

    network: nn.Module
    info: ModelInfo
    history: list[EpochMetrics]
    resumed_from: int = 0

    @property
    def metrics(self) -> dict[str, Any]:
        return self.info.extra["metrics"]

    def save(self, path: str | Path) -> Path:
        """Write the model as one self-describing safetensors file that ``load_model`` takes as is."""
        return save_safetensors_model(path, self.network, self.info)


Progress = Callable[[EpochMetrics], None]
CancelCheck = Callable[[], bool]


def train(
    config: TrainConfig,
    data: Dataset,
    *,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    name: str | None = None,
) -> TrainResult:
    """Train ``config.arch`` on ``data`` with ``config.method``; return the model and its metrics.

    ``progress(EpochMetrics)`` runs after each epoch, once that epoch's checkpoint is written;
    ``should_cancel()`` runs before each batch and a True answer raises
    :class:`~smoothcert.worker.smoothing.Canceled` (the last finished epoch stays checkpointed).
    With ``checkpoint_dir``, a checkpoint left there by an earlier call with the same
    configuration and data is resumed (a finished one is returned without training); one from a
    different run is refused with a TrainingError. Same configuration, data, device and thread
    count: same weights, whether or not the run was interrupted.
    """
    started = time.perf_counter()
    run = _Run(config, data, _device(device))
    digest = data.sha256()
    identity = {**config.to_dict(), "dataset_sha256": digest, "num_classes": run.num_classes}
    history = (
        []
        if checkpoint_dir is None
        else [
            EpochMetrics(**h)
            for h in ckpt.resume(
                checkpoint_dir, identity, run.network, run.optimizer, run.generator
            )
        ]
    )
    first = len(history)
    for epoch in range(first, config.epochs):
        tick = time.perf_counter()
        loss, accuracy = run.epoch(epoch, should_cancel)
        metrics = EpochMetrics(
            epoch=epoch + 1,
            epochs=config.epochs,
            loss=loss,
            noisy_accuracy=accuracy,
            test_noisy_accuracy=run.test_accuracy(noisy=True, epoch=epoch),
            lr=config.lr_at(epoch),
            epsilon=config.epsilon_at(epoch) if config.method == "smoothadv" else None,
            elapsed_s=time.perf_counter() - tick,
        )
        history.append(metrics)
        if checkpoint_dir is not None:
            ckpt.save_state(
                checkpoint_dir, run.state(epoch + 1, identity, [h.to_dict() for h in history])
            )
        if progress is not None:
            progress(metrics)
    info = _model_info(config, data, digest, run, history, time.perf_counter() - started, name)
    network = run.network.to("cpu").eval()
    return TrainResult(network, info, history, resumed_from=first)


def _device(device: str | torch.device) -> torch.device:
    try:
        return resolve_device(device)
    except ModelError as exc:
        raise TrainingError(str(exc)) from None


def _derived_seed(seed: int, purpose: str) -> int:
    """A seed for a side stream (evaluation), independent of the training stream."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def channel_normalization(x: np.ndarray) -> Normalization:
    """Per-channel mean and standard deviation of images (N, C, H, W), accumulated in float64.

    A (nearly) constant channel keeps std 1: dividing by a tiny std would blow the training
    noise up in that channel."""
    flat = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
    mean = flat.mean(axis=1, dtype=np.float64)
    std = np.sqrt(flat.var(axis=1, dtype=np.float64))
    return Normalization(
        mean=tuple(float(v) for v in mean), std=tuple(float(s) if s > 1e-3 else 1.0 for s in std)
    )


class _Run:
    """The mutable state of one training run: model, optimizer, generator, data on the device."""

    def __init__(self, config: TrainConfig, data: Dataset, device: torch.device):
        self.config, self.device = config, device
        self.num_classes = data.num_classes
        if self.num_classes < 2:
            raise TrainingError(
                f"{data.name}: training needs at least two classes, the labels give "
                f"{self.num_classes}"
            )
        self.normalization = channel_normalization(data.x)
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        # Construction draws a throwaway init from the global generator; fork_rng restores it.
        try:
            with torch.random.fork_rng(devices=[]):
                self.network = build_network(config.arch, self.num_classes)
        except ModelError as exc:
            raise TrainingError(str(exc)) from None
        self.network.to(device)
        init_weights(self.network, self.generator)
        self.model = nn.Sequential(
            Normalize(self.normalization, data.input_shape[0]), self.network
        ).to(device)
        self.x = torch.from_numpy(data.x).to(device)
        self.y = torch.from_numpy(data.y).to(device)
        self.test = (
            None
            if data.test_x is None
            else (
                torch.from_numpy(data.test_x).to(device),
                torch.from_numpy(data.test_y).to(device),
            )
        )
        self._check_shapes(data)
        if config.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                self.model.parameters(), lr=config.lr
            )
        else:
            self.optimizer = torch.optim.SGD(
                self.model.parameters(),
                lr=config.lr,
                momentum=SGD_MOMENTUM,
                weight_decay=SGD_WEIGHT_DECAY,
            )

    def _check_shapes(self, data: Dataset) -> None:
        try:
            with torch.no_grad():
                out = self.model.eval()(self.x[:2])
        except Exception as exc:  # torch raises RuntimeError and others for a shape mismatch
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TrainingError(
                f"{self.config.arch} cannot take {data.name}'s images of shape "
                f"{list(data.input_shape)}: {first_line}"
            ) from None
        if out.shape[1] != self.num_classes:
            raise TrainingError(
                f"{self.config.arch} outputs {out.shape[1]} scores, {data.name} has "
                f"{self.num_classes} classes"
            )

    def state(
        self, epoch: int, identity: dict[str, Any], history: list[dict]
    ) -> ckpt.TrainingState:
        return ckpt.TrainingState(
            epoch=epoch,
            model=self.network.state_dict(),
            optimizer=self.optimizer.state_dict(),
            generator=self.generator.get_state(),
            identity=identity,
            history=history,
        )

    def noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.config.sigma * torch.randn(shape, generator=self.generator, device=self.device)

    def epoch(self, epoch: int, should_cancel: CancelCheck | None) -> tuple[float, float]:
        """One pass over the training set; returns (mean loss, accuracy on the noisy copies)."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr_at(epoch)
        epsilon = config.epsilon_at(epoch)
        self.model.train()
        order = torch.randperm(len(self.x), generator=self.generator, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        for start in range(0, len(order), config.batch_size):
            if should_cancel is not None and should_cancel():
                raise Canceled("canceled")
            index = order[start : start + config.batch_size]
            x, y = self.x[index], self.y[index]
            loss, hits, copies = self._step_loss(x, y, epsilon)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach().double() * len(index)
            correct += hits
            seen += copies
        return float(loss_sum) / len(order), int(correct) / seen

    def _step_loss(
        self, x: torch.Tensor, y: torch.Tensor, epsilon: float
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The batch's loss, the number of noisy copies classified right, and how many copies."""
        config = self.config
        if config.method == "standard":
            logits = self.model(x)
            return nn.functional.cross_entropy(logits, y), (logits.argmax(1) == y).sum(), len(y)
        if config.method == "gaussian":
            logits = self.model(x + self.noise(tuple(x.shape)))
            return nn.functional.cross_entropy(logits, y), (logits.argmax(1) == y).sum(), len(y)
        noise = self.noise((len(x), config.m, *x.shape[1:]))
        if config.method == "smoothed":
            logits = noisy_logits(self.model, x, noise)
            loss = smoothed_soft_loss(logits, y).mean()
        else:
            delta = pgd_l2_smoothed(self.model, x, y, noise, epsilon, config.steps)
            logits = noisy_logits(self.model, x + delta, noise)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(config.m))
        return loss, (logits.argmax(2) == y[:, None]).sum(), logits.shape[0] * logits.shape[1]

    @torch.no_grad()
    def test_accuracy(self, noisy: bool, epoch: int = 0) -> float | None:
        """Accuracy on the test split, on one noisy copy per image (its own generator) or clean."""
        if self.test is None:
            return None
        x, y = self.test
        generator = torch.Generator(device=self.device).manual_seed(
            _derived_seed(self.config.seed, f"eval:{epoch}")
        )
        self.model.eval()
        correct = 0
        for start in range(0, len(x), EVAL_BATCH):
            batch = x[start : start + EVAL_BATCH]
            if noisy:
                batch = batch + self.config.sigma * torch.randn(
                    batch.shape, generator=generator, device=self.device
                )
            correct += int((self.model(batch).argmax(1) == y[start : start + EVAL_BATCH]).sum())
        return correct / len(x)


def _model_info(
    config: TrainConfig,
    data: Dataset,
    digest: str,
    run: _Run,
    history: list[EpochMetrics],
    elapsed_s: float,
    name: str | None,
) -> ModelInfo:
    last = history[-1]
    metrics = {
        "train_loss": last.loss,
        "train_noisy_accuracy": last.noisy_accuracy,
        "test_noisy_accuracy": run.test_accuracy(noisy=True, epoch=config.epochs),
        "test_clean_accuracy": run.test_accuracy(noisy=False),
        "test_size": None if data.test_x is None else len(data.test_x),
        "train_size": len(data.x),
        "elapsed_s": elapsed_s,
    }
    training = {
        "method": config.method,
        **config.method_params(),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "optimizer": config.optimizer,
        "seed": config.seed,
        "dataset": data.name,
        "dataset_sha256": digest,
    }
    return ModelInfo(
        format="safetensors",
        input_shape=data.input_shape,
        num_classes=run.num_classes,
        arch=config.arch,
        class_names=data.class_names,
        normalization=run.normalization,
        sigma=0.0 if config.method == "standard" else float(config.sigma),
        name=name
        or f"{data.name}-{config.arch}-{config.method}"
        + ("" if config.method == "standard" else f"-sigma{config.sigma:g}"),
        extra={
            "method": config.method,
            "training": training,
            "metrics": metrics,
            "history": [h.to_dict() for h in history],
        },
    )
