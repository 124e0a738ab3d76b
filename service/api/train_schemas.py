"""``POST /v1/train``'s body and the checks the API makes before a training job is queued.

Torch-free. The values are checked by :class:`~smoothcert.service.core.train_config.TrainConfig`
itself (one rule for the CLI, the API and the worker); this module adds what only the API can
know: that the dataset exists and that its images fit the architecture. :data:`ARCH_INPUTS`
repeats, without torch, which images each allow-listed architecture takes
(``models/architectures.py`` builds the networks; a test keeps the two in step).
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from smoothcert.service.api.schemas import Name, integral
from smoothcert.service.core.params import MAX_SEED
from smoothcert.service.core.train_config import (
    METHODS,
    OBJECTIVES,
    OPTIMIZERS,
    DenoiserConfig,
    TrainConfig,
    TrainingError,
)

# (channels, height, width) an architecture takes; None: any size (the ResNets pool adaptively,
# digits_cnn's fully connected layer fixes 8x8).
ARCH_INPUTS: dict[str, tuple[int, int | None, int | None]] = {
    "digits_cnn": (1, 8, 8),
    "cifar_resnet20": (3, None, None),
    "cifar_resnet110": (3, None, None),
    "imagenet_resnet50": (3, None, None),
}
# Datasets every worker has without an upload: input shape [C, H, W] and class count.
BUILTIN_DATASETS: dict[str, dict[str, Any]] = {
    "digits": {"input_shape": [1, 8, 8], "num_classes": 10}
}
# Upper bounds that keep one request from occupying a trainer for months.
MAX_EPOCHS, MAX_M, MAX_STEPS, MAX_BATCH_SIZE = 10_000, 1024, 1000, 65_536


def _default(name: str, config: type = TrainConfig) -> Any:
    [f] = [f for f in fields(config) if f.name == name]
    return None if f.default is MISSING else f.default


class TrainRequest(BaseModel):
    """What to train: TrainConfig's fields (their defaults too), the dataset and the model's name.

    Ranges are checked by TrainConfig (epochs, batch_size, m, steps >= 1; warmup_epochs >= 0;
    lr > 0; epsilon >= 0); ``sigma`` must be positive here, since the model is registered for
    certification at that σ. ``seed`` is drawn and recorded when absent. Types are strict, as
    for ``POST /v1/certify`` (:mod:`smoothcert.service.api.schemas`): ``"epochs": "5"`` and
    ``"seed": true`` are refused, naming the field.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str = Field(
        min_length=1,
        max_length=64,
        description='"digits" (built in) or the id of a dataset uploaded to /v1/datasets',
    )
    # The enums document the choices; TrainConfig (method, optimizer) and check_fits (arch) refuse others.
    arch: str = Field(_default("arch"), json_schema_extra={"enum": list(ARCH_INPUTS)})
    method: str = Field(_default("method"), json_schema_extra={"enum": list(METHODS)})
    sigma: float = Field(
        _default("sigma"),
        gt=0,
        allow_inf_nan=False,
        description="training noise level, in [0,1] pixel units",
    )
    epochs: int = Field(_default("epochs"), le=MAX_EPOCHS)
    batch_size: int = Field(
        _default("batch_size"), le=MAX_BATCH_SIZE, description="images per step"
    )
    lr: float = Field(
        _default("lr"), description="initial learning rate (cosine schedule towards 0)"
    )
    optimizer: str = Field(_default("optimizer"), json_schema_extra={"enum": list(OPTIMIZERS)})
    m: int = Field(
        _default("m"), le=MAX_M, description="noise samples per image (smoothed, smoothadv)"
    )
    epsilon: float = Field(
        _default("epsilon"),
        description="smoothadv: l2 attack radius in [0,1] pixel units "
        "(Salman et al.'s --epsilon 64 is 64/256 = 0.25)",
    )
    steps: int = Field(_default("steps"), le=MAX_STEPS, description="smoothadv: PGD steps")
    warmup_epochs: int = Field(
        _default("warmup_epochs"), description="smoothadv: epochs over which epsilon grows"
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="drawn and recorded when absent")
    name: Name | None = Field(None, description="the registered model's name")

    @field_validator("epochs", "batch_size", "m", "steps", "warmup_epochs", "seed", mode="before")
    @classmethod
    def _integral(cls, value: Any) -> Any:
        return integral(value)

    def config(self, seed: int) -> TrainConfig:
        """The TrainConfig of this request with ``seed``; TrainingError when a value is out of range."""
        values = self.model_dump(exclude={"dataset", "seed", "name"})
        return TrainConfig(**values, seed=seed)


class DatasetUnknown(LookupError):
    """No built-in or uploaded dataset has that name or id."""


def dataset_shape(dataset: str, uploaded: dict[str, Any] | None) -> tuple[list[int], int]:
    """``dataset``'s input shape [C, H, W] and class count; ``uploaded`` is its record, if any.

    DatasetUnknown when it is neither built in nor uploaded.
    """
    if dataset in BUILTIN_DATASETS:
        known = BUILTIN_DATASETS[dataset]
        return list(known["input_shape"]), known["num_classes"]
    if uploaded is None:
        raise DatasetUnknown(
            f"unknown dataset {dataset!r}: give {' or '.join(BUILTIN_DATASETS)}, "
            "or the id of a dataset uploaded to /v1/datasets"
        )
    return list(uploaded["input_shape"]), int(uploaded["label_range"][1]) + 1


def check_fits(arch: str, input_shape: list[int], num_classes: int, dataset: str) -> None:
    """ValueError (one line) unless ``arch`` is allow-listed and takes ``dataset``'s images."""
    if arch not in ARCH_INPUTS:
        raise ValueError(
            f"unknown architecture {arch!r}; allowed: {', '.join(sorted(ARCH_INPUTS))}"
        )
    takes = ARCH_INPUTS[arch]
    if len(input_shape) != 3 or any(
        want is not None and want != got for want, got in zip(takes, input_shape)
    ):
        wanted = "x".join("any" if d is None else str(d) for d in takes)
        raise ValueError(
            f"{arch} takes images of shape {wanted} (CxHxW), dataset {dataset} holds "
            f"{'x'.join(map(str, input_shape))}"
        )
    if num_classes < 2:
        raise ValueError(f"dataset {dataset} has a single class; training needs at least two")


class DenoiserTrainRequest(BaseModel):
    """``POST /v1/train/denoiser``: DenoiserConfig's fields, the dataset, the frozen classifier
    (a model id; required by ``stability``) and the denoiser's name. Strict types, as for
    :class:`TrainRequest`; ``seed`` is drawn and recorded when absent.

    ``batch_size`` and ``lr`` left out take the objective's defaults (mse 128 and 1e-3,
    stability 32 and 3e-4). ``stability`` without ``init`` trains in two stages: an MSE denoiser
    of ``mse_epochs`` epochs (default: ``epochs``; 0: none, stability from scratch) with MSE's
    defaults and a seed derived from ``seed``, then ``epochs`` of stability from it; the job's
    progress counts the epochs of both. With ``init`` there is no MSE stage, and a positive
    ``mse_epochs`` is refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str = Field(
        min_length=1,
        max_length=64,
        description='"digits" (built in) or the id of a dataset uploaded to /v1/datasets',
    )
    objective: str = Field(
        _default("objective", DenoiserConfig),
        json_schema_extra={"enum": list(OBJECTIVES)},
        description="mse: ||D(x+δ) - x||²; stability: cross-entropy of the classifier on "
        "D(x+δ) against its label on x",
    )
    classifier: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="id of a stored safetensors classifier; required by stability",
    )
    init: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="id of a stored denoiser of the same depth and width to start from "
        "(e.g. an mse one, fine-tuned with stability)",
    )
    sigma: float = Field(
        _default("sigma", DenoiserConfig),
        gt=0,
        allow_inf_nan=False,
        description="noise level, in [0,1] pixel units",
    )
    epochs: int = Field(
        _default("epochs", DenoiserConfig),
        le=MAX_EPOCHS,
        description="epochs of the objective (stability: of its stage after the MSE stage)",
    )
    mse_epochs: int | None = Field(
        None,
        le=MAX_EPOCHS,
        description="stability without init: epochs of the MSE stage trained first and started "
        "from (default: epochs; 0: stability from scratch)",
    )
    batch_size: int | None = Field(
        None,
        le=MAX_BATCH_SIZE,
        description="images per step (default: 128 for mse, 32 for stability)",
    )
    lr: float | None = Field(
        None,
        description="initial Adam learning rate, cosine towards 0 (default: 1e-3 for mse, "
        "3e-4 for stability)",
    )
    depth: int = Field(_default("depth", DenoiserConfig), description="DnCNN convolutions, 2 to 64")
    width: int = Field(_default("width", DenoiserConfig), description="DnCNN channels, 1 to 1024")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="drawn and recorded when absent")
    name: Name | None = Field(None, description="the registered denoiser's name")

    @field_validator("epochs", "mse_epochs", "batch_size", "depth", "width", "seed", mode="before")
    @classmethod
    def _integral(cls, value: Any) -> Any:
        return integral(value)

    def config(self, seed: int) -> DenoiserConfig:
        """The DenoiserConfig of this request with ``seed`` (``mse_epochs`` 0 when it starts from
        ``init``); TrainingError when a value is out of range or ``init`` comes with a positive
        ``mse_epochs``."""
        values = self.model_dump(exclude={"dataset", "classifier", "init", "seed", "name"})
        if self.init is not None:
            if self.mse_epochs:
                raise TrainingError(
                    "mse_epochs trains the MSE stage a stability run starts from; a run given "
                    "init starts from that denoiser instead"
                )
            values["mse_epochs"] = 0
        return DenoiserConfig(**values, seed=seed)


class ModelUnknown(LookupError):
    """No stored model has that id."""


def check_denoiser_classifier(
    meta: dict[str, Any] | None, model_id: str, input_shape: list[int], dataset: str
) -> None:
    """ModelUnknown when ``meta`` (the record of ``model_id``) is None; ValueError (one line) unless
    it is a safetensors classifier that takes ``dataset``'s images (the stability objective
    back-propagates through it)."""
    if meta is None:
        raise ModelUnknown(f"unknown classifier model {model_id!r}")
    kind = meta.get("kind", "classifier")
    if kind != "classifier" or meta.get("format") != "safetensors":
        what = f"a {kind}" if kind != "classifier" else f"an {meta.get('format')} classifier"
        raise ValueError(
            f"model {model_id} is {what}; the classifier must be a single safetensors classifier "
            "(training back-propagates through it)"
        )
    if list(meta["input_shape"]) != list(input_shape):
        raise ValueError(
            f"the classifier {model_id} takes images of shape {meta['input_shape']}, dataset {dataset} "
            f"holds {input_shape}"
        )


def check_init_denoiser(
    meta: dict[str, Any] | None, model_id: str, input_shape: list[int], config: DenoiserConfig
) -> None:
    """ModelUnknown when ``meta`` (the record of ``model_id``) is None; ValueError unless it is a
    denoiser of ``config``'s architecture and size for images of ``input_shape``."""
    if meta is None:
        raise ModelUnknown(f"unknown init denoiser {model_id!r}")
    if meta.get("kind") != "denoiser":
        raise ValueError(f"model {model_id} is not a denoiser; init must be a stored denoiser")
    extra = meta.get("extra") or {}
    theirs = (meta.get("arch"), extra.get("depth"), extra.get("width"), list(meta["input_shape"]))
    ours = (config.arch, config.depth, config.width, list(input_shape))
    if theirs != ours:
        raise ValueError(
            f"the init denoiser {model_id} is {theirs[0]} of depth {theirs[1]} and width {theirs[2]} "
            f"for {theirs[3]} images; this run trains {ours[0]} of depth {ours[1]} and width {ours[2]} "
            f"for {ours[3]}"
        )
