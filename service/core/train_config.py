"""What a training job trains and how: :class:`TrainConfig`, validated, JSON-able and torch-free.

Torch-free on purpose: the CLI's argument parser and the API can build and check a configuration
without a model runtime. :func:`smoothcert.worker.training.trainer.train` runs it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral
from typing import Any

from smoothcert.service.core.params import MAX_SEED, draw_seed

METHODS = ("gaussian", "smoothed", "smoothadv", "standard")
OPTIMIZERS = ("adam", "sgd")


class TrainingError(ValueError):
    """A training configuration or dataset that cannot be trained; the message says why, in one line."""


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how. Plain JSON fields, so a job message can carry ``to_dict()``.

    ``m`` (noise samples per image) concerns smoothed and smoothadv; ``epsilon``, ``steps`` and
    ``warmup_epochs`` concern smoothadv. ``epsilon`` is an ℓ₂ radius in [0,1] pixel units
    (Salman et al.'s ``--epsilon 64`` is 64/256 = 0.25); it grows linearly to its full value over
    the first ``warmup_epochs`` epochs (0 or 1: no warm-up). ``batch_size`` counts images; a step
    of smoothed or smoothadv runs the network on ``batch_size * m`` noisy copies. The learning
    rate follows a cosine from ``lr`` towards 0 over the epochs; ``optimizer`` is Adam, or SGD
    with momentum 0.9 and weight decay 1e-4. ``seed`` is drawn when not given; a run that should
    resume after a kill must be given the same one again. ``standard`` trains on clean images (a
    classifier that never saw noise, as most users have): its ``sigma`` is only the noise of the
    noisy test accuracy it reports, and the model records a training σ of 0.
    """

    arch: str = "digits_cnn"
    method: str = "gaussian"
    sigma: float = 0.25
    epochs: int = 20
    batch_size: int = 128
    lr: float = 5e-3
    optimizer: str = "adam"
    m: int = 4
    epsilon: float = 0.25
    steps: int = 2
    warmup_epochs: int = 1
    seed: int = field(default_factory=draw_seed)

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise TrainingError(f"arch must name an architecture, not {self.arch!r}")
        if self.method not in METHODS:
            raise TrainingError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}"
            )
        for name, low in (
            ("epochs", 1),
            ("batch_size", 1),
            ("m", 1),
            ("steps", 1),
            ("warmup_epochs", 0),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, Integral)
                or not low <= int(value) <= MAX_SEED
            ):
                raise TrainingError(
                    f"{name} must be an integer >= {low} (and below 2^63), not {value!r}"
                )
        for name, positive in (("sigma", False), ("lr", True), ("epsilon", False)):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
                or (positive and value == 0)
            ):
                kind = "positive" if positive else "non-negative"
                raise TrainingError(f"{name} must be a {kind} number, not {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict such as ``to_dict()``'s; unknown keys are refused."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise TrainingError(f"unknown training parameter(s): {', '.join(unknown)}")
        return cls(**values)

    def method_params(self) -> dict[str, Any]:
        """The parameters that matter for this method (what the model's metadata records)."""
        params: dict[str, Any] = {"sigma": 0.0 if self.method == "standard" else self.sigma}
        if self.method in ("smoothed", "smoothadv"):
            params["m"] = self.m
        if self.method == "smoothadv":
            params.update(epsilon=self.epsilon, steps=self.steps, warmup_epochs=self.warmup_epochs)
        return params

    def epsilon_at(self, epoch: int) -> float:
        """SmoothAdv's ε in 0-based ``epoch``: ε·(epoch+1)/warmup_epochs, at most ε."""
        return self.epsilon * min(1.0, (epoch + 1) / max(1, self.warmup_epochs))

    def lr_at(self, epoch: int) -> float:
        """The cosine schedule: ``lr`` in epoch 0, falling towards 0 by the last epoch."""
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))


OBJECTIVES = ("mse", "stability")
STABILITY_NEEDS_CLASSIFIER = (
    "the stability objective needs the frozen classifier it trains the denoiser for "
    "(--classifier MODEL, or classifier in the request); mse does not"
)
DENOISER_ARCHS = ("dncnn",)


# The batch size and learning rate of each objective when not given: MSE trains from scratch with
# 128 and 1e-3; stability fine-tunes the MSE denoiser with 32 and 3e-4, the recipe that measured
# best on digits (docs/guide/denoisers.md).
DENOISER_SCHEDULES: dict[str, tuple[int, float]] = {"mse": (128, 1e-3), "stability": (32, 3e-4)}


@dataclass(frozen=True)
class DenoiserConfig:
    """How to train a denoiser D for denoised smoothing at noise level ``sigma``.

    ``objective`` is ``mse``, the mean squared error between D(x + δ) and x, or ``stability``
    (Salman et al. 2020), the cross-entropy of a frozen classifier f's scores on D(x + δ) against
    its own label on the clean x, which needs that classifier. δ ~ N(0, σ²I) in [0,1] pixel
    space, one draw per image and step. ``depth`` and ``width`` size the DnCNN (convolutions,
    channels between them). Adam, with the learning rate on a cosine from ``lr`` towards 0.
    ``seed`` as for :class:`TrainConfig`.

    ``batch_size`` and ``lr`` left out (None) take the objective's :data:`DENOISER_SCHEDULES`
    (mse 128 and 1e-3, stability 32 and 3e-4); given values win. ``stability`` trains in two
    stages unless told otherwise: first an MSE denoiser of ``mse_epochs`` epochs (None: as many as
    ``epochs``) with MSE's batch size and learning rate, then the stability objective from its
    weights for ``epochs`` epochs; ``mse_epochs = 0`` trains stability from scratch, and a run
    given a denoiser to start from (``init``) trains no MSE stage (its trainer sets 0). ``mse``
    has no MSE stage (``mse_epochs`` 0; a positive one is refused). After construction the three
    hold their resolved values, so ``to_dict()`` records what is trained.
    """

    arch: str = "dncnn"
    objective: str = "mse"
    sigma: float = 0.5
    epochs: int = 20
    batch_size: int | None = None
    lr: float | None = None
    depth: int = 6
    width: int = 32
    seed: int = field(default_factory=draw_seed)
    mse_epochs: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in DENOISER_ARCHS:
            raise TrainingError(
                f"arch must be a denoiser architecture ({', '.join(DENOISER_ARCHS)}), "
                f"not {self.arch!r}"
            )
        if self.objective not in OBJECTIVES:
            raise TrainingError(
                f"objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}"
            )
        batch_size, lr = DENOISER_SCHEDULES[self.objective]
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", batch_size)
        if self.lr is None:
            object.__setattr__(self, "lr", lr)
        if self.mse_epochs is None:
            object.__setattr__(self, "mse_epochs", self.epochs if self.needs_classifier else 0)
        for name, low, high in (
            ("epochs", 1, MAX_SEED),
            ("batch_size", 1, MAX_SEED),
            ("depth", 2, 64),
            ("width", 1, 1024),
            ("seed", 0, MAX_SEED),
            ("mse_epochs", 0, MAX_SEED),
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, Integral)
                or not low <= int(value) <= high
            ):
                raise TrainingError(
                    f"{name} must be an integer from {low} to {high}, not {value!r}"
                )
        for name in ("sigma", "lr"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise TrainingError(f"{name} must be a positive number, not {value!r}")
        if self.objective == "mse" and self.mse_epochs:
            raise TrainingError(
                "mse_epochs is the MSE stage that the stability objective starts from; "
                "an mse run has none"
            )

    @property
    def needs_classifier(self) -> bool:
        return self.objective == "stability"

    @property
    def total_epochs(self) -> int:
        """The epochs of both stages: the MSE stage's (``mse_epochs``), then ``epochs``."""
        return self.epochs + int(self.mse_epochs or 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DenoiserConfig:
        """Build from a dict such as ``to_dict()``'s; unknown keys are refused."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise TrainingError(f"unknown denoiser training parameter(s): {', '.join(unknown)}")
        return cls(**values)

    def lr_at(self, epoch: int) -> float:
        """The cosine schedule: ``lr`` in epoch 0, falling towards 0 by the last epoch."""
        assert self.lr is not None  # resolved in __post_init__
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))


@dataclass(frozen=True)
class DiffusionConfig:
    """How to train an ε-prediction diffusion model for one-step diffusion denoising.

    DDPM's loss (Ho et al. 2020): a timestep t uniform over 0 … T−1 and ε ~ N(0, I) per image and
    step, images scaled to [−1, 1], the MSE between ε and the network's ε̂(√ᾱ_t·x + √(1 − ᾱ_t)·ε, t).
    The β schedule is linear from ``beta_start`` to ``beta_end`` over ``timesteps`` (T) steps;
    ᾱ_t = Π (1 − β_s) goes into the file's metadata. A shorter T is fine: one-step denoising only
    needs some step near each σ (the last step must reach the largest σ certified). ``width``
    sizes the diffusion_unet (channels at full resolution). Adam, the learning rate on a cosine
    from ``lr`` towards 0. ``seed`` as for :class:`TrainConfig`; ``name`` is the model's name
    (default DATASET-diffusion-T). The defaults are the digits recipe of docs/guide/denoisers.md
    (a few minutes on two CPU cores).
    """

    epochs: int = 60
    batch_size: int = 128
    lr: float = 3e-3
    timesteps: int = 300
    beta_start: float = 1e-4
    beta_end: float = 0.02
    width: int = 32
    seed: int = field(default_factory=draw_seed)
    name: str | None = None

    def __post_init__(self) -> None:
        for name, low, high in (
            ("epochs", 1, MAX_SEED),
            ("batch_size", 1, MAX_SEED),
            ("timesteps", 1, 100_000),
            ("width", 2, 1024),
            ("seed", 0, MAX_SEED),
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, Integral)
                or not low <= int(value) <= high
            ):
                raise TrainingError(
                    f"{name} must be an integer from {low} to {high}, not {value!r}"
                )
        for name in ("lr", "beta_start", "beta_end"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise TrainingError(f"{name} must be a positive number, not {value!r}")
        if not self.beta_start <= self.beta_end < 1:
            raise TrainingError(
                f"the β schedule needs beta_start <= beta_end < 1, not {self.beta_start} and "
                f"{self.beta_end}"
            )
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise TrainingError(f"name must be a non-empty string, not {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DiffusionConfig:
        """Build from a dict such as ``to_dict()``'s; unknown keys are refused."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise TrainingError(f"unknown diffusion training parameter(s): {', '.join(unknown)}")
        return cls(**values)

    def lr_at(self, epoch: int) -> float:
        """The cosine schedule: ``lr`` in epoch 0, falling towards 0 by the last epoch."""
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
