"""Training denoisers for denoised smoothing (Salman et al. 2020): MSE or the stability objective.

D is trained on noisy copies x + δ, δ ~ N(0, σ²I) added in [0,1] pixel space exactly as at
certification. ``mse`` minimizes ‖D(x + δ) − x‖²; ``stability`` minimizes the cross-entropy of a
frozen classifier f on D(x + δ) (clamped to [0, 1], as at certification) against f's own label
on the clean x, so D learns to keep f's answer rather than every pixel. Every random draw comes
from one generator seeded per run; with a ``checkpoint_dir`` each finished epoch is saved and a
later call with the same configuration, data and classifier resumes to the same weights as an
uninterrupted run (:mod:`smoothcert.worker.training.checkpoints`). No Celery here.

``stability`` without a denoiser to start from trains in two stages (Salman et al.'s recipe, which
measured far better than stability from scratch): first an MSE denoiser (:func:`mse_stage`:
``config.mse_epochs`` epochs with MSE's batch size and learning rate, its seed derived from the
run's), then the stability objective from its weights. The history counts the epochs of both
stages in one sequence (``epoch`` 1 … ``config.total_epochs``) and names each epoch's ``stage``.
With a ``checkpoint_dir`` the MSE stage is checkpointed in its sub-folder ``mse-stage`` and the
stability stage in the folder itself, so a run killed in either stage resumes where it was, to
the same weights.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoothcert.models.architectures import build_denoiser
from smoothcert.models.base import BaseClassifier
from smoothcert.models.denoisers import TorchDenoiser, save_denoiser
from smoothcert.models.metadata import DenoiserInfo, ModelError
from smoothcert.models.reproducible import init_weights
from smoothcert.service.core.train_config import STABILITY_NEEDS_CLASSIFIER as NEEDS_CLASSIFIER
from smoothcert.service.core.train_config import DenoiserConfig, TrainingError
from smoothcert.worker.data.datasets import Dataset
from smoothcert.worker.smoothing.sampling import Canceled
from smoothcert.worker.training import checkpoints as ckpt
from smoothcert.worker.training.trainer import EVAL_BATCH, _derived_seed, _device

# The sub-folder of a two-stage run's checkpoint folder that holds its MSE stage's checkpoint.
MSE_STAGE_DIR = "mse-stage"


@dataclass
class DenoiserEpoch:
    """One finished epoch: the training loss, and on the test split (when there is one) the MSE
    of D(x + δ) against x and, with a classifier, its accuracy on D(x + δ). ``epoch`` counts
    over the whole run (a two-stage run's MSE epochs first), ``epochs`` is the run's total and
    ``stage`` the objective this epoch trained (``mse`` or ``stability``); ``lr`` is its stage's."""

    epoch: int  # 1-based, over all stages
    epochs: int
    stage: str
    loss: float
    test_mse: float | None
    test_denoised_accuracy: float | None
    lr: float
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DenoiserResult:
    """The trained denoiser (eval mode, on the CPU), its self-describing metadata and history."""

    network: nn.Module
    info: DenoiserInfo
    history: list[DenoiserEpoch]
    resumed_from: int = 0

    @property
    def metrics(self) -> dict[str, Any]:
        return self.info.extra["metrics"]

    def save(self, path: str | Path) -> Path:
        """One self-describing safetensors file that ``--denoiser`` and the model store take as it is."""
        return save_denoiser(path, self.network, self.info)


Progress = Callable[[DenoiserEpoch], None]


def frozen_module(classifier: BaseClassifier | None) -> nn.Module | None:
    """The torch module (normalization included) of a loaded classifier, frozen; TrainingError for
    one that torch cannot differentiate (an ONNX file)."""
    if classifier is None:
        return None
    module = getattr(classifier, "module", None)
    if not isinstance(module, nn.Module):
        raise TrainingError(
            "the stability objective back-propagates through the classifier: give a .safetensors "
            f"classifier, not a {classifier.info.format} one"
        )
    module = module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def mse_stage(config: DenoiserConfig) -> DenoiserConfig:
    """The MSE stage a two-stage stability run trains first: the ``mse`` objective for
    ``config.mse_epochs`` epochs with MSE's own batch size and learning rate (128, 1e-3), the same
    σ, architecture and size. Its seed is derived from the run's: the first 63 bits of
    sha256(f"{config.seed}:mse-stage") (big-endian), so one seed fixes both stages and their
    random streams are independent."""
    return DenoiserConfig(
        arch=config.arch,
        objective="mse",
        sigma=config.sigma,
        epochs=int(config.mse_epochs or 0),
        depth=config.depth,
        width=config.width,
        seed=_derived_seed(config.seed, "mse-stage"),
    )


def checkpointed_seed(directory: str | Path) -> int | None:
    """The seed of the run whose checkpoint ``directory`` holds (its stability stage's, else the
    MSE stage's of a two-stage run that was stopped in it), so that the same command resumes it;
    None when there is none."""
    saved = ckpt.saved_identity(directory)
    if saved is None:
        saved = ckpt.saved_identity(Path(directory) / MSE_STAGE_DIR) or {}
        saved = {"seed": saved.get("run_seed")}
    seed = saved.get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def train_denoiser(
    config: DenoiserConfig,
    data: Dataset,
    classifier: BaseClassifier | None = None,
    *,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    name: str | None = None,
    init: TorchDenoiser | None = None,
) -> DenoiserResult:
    """Train a ``config.arch`` denoiser for ``data``'s images at ``config.sigma``.

    ``classifier`` (a loaded base classifier taking ``data``'s images) is required by the
    stability objective (TrainingError without it) and, given to MSE, only measured on. ``init``, a
    loaded denoiser of the same architecture and size, gives the starting weights instead of a
    random draw (Salman et al. fine-tune an MSE-trained denoiser with the stability objective);
    with it no MSE stage is trained (``config.mse_epochs`` is taken as 0). Without it, a
    stability config with ``mse_epochs`` > 0 first trains :func:`mse_stage` and starts from
    its weights. Progress, cancellation and checkpoints as
    :func:`~smoothcert.worker.training.trainer.train`, over both stages: the run's identity
    includes the classifier's sha256 (and a two-stage run's the MSE stage's weights), so a
    checkpoint of another classifier is refused.
    """
    if config.needs_classifier and classifier is None:
        raise TrainingError(NEEDS_CLASSIFIER)
    if init is not None and config.mse_epochs:
        config = replace(config, mse_epochs=0)
    started = time.perf_counter()
    where = _device(device)
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)
    common = {
        "kind": "denoiser",
        "dataset_sha256": data.sha256(),
        "classifier_sha256": None if classifier is None else classifier.info.sha256,
    }
    identity = {
        **config.to_dict(),
        **common,
        "init_sha256": None if init is None else init.info.sha256,
    }
    stages: list[dict[str, Any]] = []
    history: list[DenoiserEpoch] = []
    resumed = 0
    start: dict[str, torch.Tensor] | None = None
    if config.mse_epochs:
        first = mse_stage(config)
        if directory is not None:
            # Refuse a stability checkpoint of another run before hours of MSE training.
            _check_saved(directory, identity, unchecked=("mse_stage_sha256",))
        run, history, resumed = _train_stage(
            first,
            data,
            classifier,
            where,
            None,
            {**first.to_dict(), **common, "init_sha256": None, "run_seed": config.seed},
            _Stage(0, config.total_epochs, progress, should_cancel),
            None if directory is None else directory / MSE_STAGE_DIR,
        )
        start = run.network.state_dict()
        digest = _state_sha256(start)
        identity["mse_stage_sha256"] = digest
        stages.append({**_stage_record(first), "state_sha256": digest})
    elif init is not None:
        start = _init_state(init, config, data)
    run, final, resumed_final = _train_stage(
        config,
        data,
        classifier,
        where,
        start,
        identity,
        _Stage(len(history), config.total_epochs, progress, should_cancel),
        directory,
    )
    history += final
    stages.append(_stage_record(config))
    info = _denoiser_info(
        config,
        data,
        identity,
        classifier,
        history,
        time.perf_counter() - started,
        name,
        stages,
    )
    return DenoiserResult(
        run.network.to("cpu").eval(), info, history, resumed_from=resumed + resumed_final
    )


@dataclass
class _Stage:
    """Where a stage's epochs sit in the run: after ``offset`` epochs, of ``total`` in all."""

    offset: int
    total: int
    progress: Progress | None
    should_cancel: Callable[[], bool] | None


def _train_stage(
    config: DenoiserConfig,
    data: Dataset,
    classifier: BaseClassifier | None,
    device: torch.device,
    start: dict[str, torch.Tensor] | None,
    identity: dict[str, Any],
    stage: _Stage,
    directory: Path | None,
) -> tuple[_DenoiserRun, list[DenoiserEpoch], int]:
    """Train (or resume) one stage from ``start``'s weights (None: a random draw); the run, its
    epochs' history and how many of them came from the checkpoint in ``directory``."""
    run = _DenoiserRun(config, data, classifier, device, start)
    history = (
        []
        if directory is None
        else [
            DenoiserEpoch(**h)
            for h in ckpt.resume(directory, identity, run.network, run.optimizer, run.generator)
        ]
    )
    first = len(history)
    for epoch in range(first, config.epochs):
        tick = time.perf_counter()
        loss = run.epoch(epoch, stage.should_cancel)
        test_mse, test_accuracy = run.evaluate(epoch)
        metrics = DenoiserEpoch(
            epoch=stage.offset + epoch + 1,
            epochs=stage.total,
            stage=config.objective,
            loss=loss,
            test_mse=test_mse,
            test_denoised_accuracy=test_accuracy,
            lr=config.lr_at(epoch),
            elapsed_s=time.perf_counter() - tick,
        )
        history.append(metrics)
        if directory is not None:
            ckpt.save_state(
                directory,
                ckpt.TrainingState(
                    epoch=epoch + 1,
                    model=run.network.state_dict(),
                    optimizer=run.optimizer.state_dict(),
                    generator=run.generator.get_state(),
                    identity=identity,
                    history=[h.to_dict() for h in history],
                ),
            )
        if stage.progress is not None:
            stage.progress(metrics)
    return run, history, first


def _check_saved(directory: Path, identity: dict[str, Any], unchecked: tuple[str, ...]) -> None:
    """TrainingError when ``directory`` holds a checkpoint of a run other than ``identity``'s,
    judged on every key but ``unchecked`` (those known only later)."""
    saved = ckpt.saved_identity(directory)
    if saved is None:
        return
    keys = sorted((set(saved) | set(identity)) - set(unchecked))
    wrong = [k for k in keys if saved.get(k) != identity.get(k)]
    if wrong:
        key = wrong[0]
        raise TrainingError(
            f"the checkpoint in {directory} belongs to another run ({key}: {saved.get(key)!r} "
            f"there, {identity.get(key)!r} now); use another checkpoint folder or delete it to "
            "start over"
        )


def _state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A digest of a network's weights: sha256 over its tensors' names and bytes, sorted by name."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def _stage_record(config: DenoiserConfig) -> dict[str, Any]:
    """What the provenance says of one stage."""
    return {
        "objective": config.objective,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
    }


def _init_state(init: TorchDenoiser, config: DenoiserConfig, data: Dataset) -> dict[str, Any]:
    """The weights of ``init``; TrainingError unless it is the denoiser ``config`` trains."""
    try:
        with torch.random.fork_rng(devices=[]):
            ours = build_denoiser(
                config.arch, data.input_shape[0], depth=config.depth, width=config.width
            )
    except ModelError as exc:
        raise TrainingError(str(exc)) from None
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    state = init.module.state_dict()
    if (
        init.info.arch != config.arch
        or shapes != {k: tuple(v.shape) for k, v in state.items()}
        or tuple(init.info.input_shape) != data.input_shape
    ):
        raise TrainingError(
            f"the initial denoiser ({init.info.arch}, depth {init.info.extra.get('depth')}, width "
            f"{init.info.extra.get('width')}, input {list(init.info.input_shape)}) is not the "
            f"{config.arch} of depth {config.depth} and width {config.width} for "
            f"{list(data.input_shape)} images that this run trains"
        )
    return state


class _DenoiserRun:
    """The mutable state of one denoiser training run."""

    def __init__(
        self,
        config: DenoiserConfig,
        data: Dataset,
        classifier: BaseClassifier | None,
        device: torch.device,
        start: dict[str, torch.Tensor] | None = None,
    ):
        self.config, self.device = config, device
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        try:
            with torch.random.fork_rng(devices=[]):
                self.network = build_denoiser(
                    config.arch, data.input_shape[0], depth=config.depth, width=config.width
                )
        except ModelError as exc:
            raise TrainingError(str(exc)) from None
        self.network.to(device)
        # drawn with a start too: the stream stays the same
        init_weights(self.network, self.generator)
        if start is not None:
            self.network.load_state_dict({k: v.detach().to(device) for k, v in start.items()})
        self.x = torch.from_numpy(data.x).to(device)
        self.test = (
            None
            if data.test_x is None
            else (
                torch.from_numpy(data.test_x).to(device),
                torch.from_numpy(data.test_y).to(device),
            )
        )
        if classifier is not None and tuple(classifier.info.input_shape) != tuple(data.input_shape):
            raise TrainingError(
                f"the classifier takes images of shape {list(classifier.info.input_shape)}, "
                f"{data.name} holds {list(data.input_shape)}"
            )
        self.classifier = frozen_module(classifier)
        if self.classifier is not None:
            self.classifier.to(device)
        # The stability targets: the frozen classifier's own labels on the clean training images.
        self.targets = None if self.classifier is None else self._labels(self.x)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=config.lr_at(0))

    @torch.no_grad()
    def _labels(self, x: torch.Tensor) -> torch.Tensor:
        assert self.classifier is not None
        return torch.cat(
            [self.classifier(x[i : i + EVAL_BATCH]).argmax(1) for i in range(0, len(x), EVAL_BATCH)]
        )

    def epoch(self, epoch: int, should_cancel: Callable[[], bool] | None) -> float:
        """One pass over the training images; the mean loss."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr_at(epoch)
        self.network.train()
        order = torch.randperm(len(self.x), generator=self.generator, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        batch_size = int(config.batch_size or 0)
        for first in range(0, len(order), batch_size):
            if should_cancel is not None and should_cancel():
                raise Canceled("canceled")
            index = order[first : first + batch_size]
            x = self.x[index]
            noisy = x + config.sigma * torch.randn(
                x.shape, generator=self.generator, device=self.device
            )
            out = self.network(noisy)
            if self.config.objective == "mse":
                loss = nn.functional.mse_loss(out, x)
            else:
                assert self.classifier is not None and self.targets is not None
                loss = nn.functional.cross_entropy(
                    self.classifier(out.clamp(0.0, 1.0)), self.targets[index]
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach().double() * len(index)
        return float(loss_sum) / len(order)

    @torch.no_grad()
    def evaluate(self, epoch: int) -> tuple[float | None, float | None]:
        """(MSE of the clamped D(x + δ) against x, the classifier's accuracy on it) over the test
        split, one noise draw per image from a generator of its own; Nones without a test split."""
        if self.test is None:
            return None, None
        x, y = self.test
        generator = torch.Generator(device=self.device).manual_seed(
            _derived_seed(self.config.seed, f"eval:{epoch}")
        )
        self.network.eval()
        squared, correct = 0.0, 0
        for start in range(0, len(x), EVAL_BATCH):
            batch = x[start : start + EVAL_BATCH]
            noise = self.config.sigma * torch.randn(
                batch.shape, generator=generator, device=self.device
            )
            clean = self.network(batch + noise).clamp(0.0, 1.0)
            squared += float(((clean - batch) ** 2).sum())
            if self.classifier is not None:
                correct += int(
                    (self.classifier(clean).argmax(1) == y[start : start + EVAL_BATCH]).sum()
                )
        return squared / x.numel(), (correct / len(x) if self.classifier is not None else None)


def _denoiser_info(
    config: DenoiserConfig,
    data: Dataset,
    identity: dict[str, Any],
    classifier: BaseClassifier | None,
    history: list[DenoiserEpoch],
    elapsed_s: float,
    name: str | None,
    stages: list[dict[str, Any]],
) -> DenoiserInfo:
    """The file's metadata. ``training`` holds the configuration of the stage that made the
    denoiser (objective, epochs, batch size, lr, seed) and ``stages``, each stage's in the order
    trained: a two-stage run's MSE stage first (its derived seed, epochs, batch size, lr and the
    sha256 of the weights it handed on), then the stability stage."""
    last = history[-1]
    training = {
        "objective": config.objective,
        "sigma": config.sigma,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "mse_epochs": config.mse_epochs,
        "stages": stages,
        "dataset": data.name,
        "dataset_sha256": identity["dataset_sha256"],
        "classifier_sha256": identity["classifier_sha256"],
        "classifier": None if classifier is None else classifier.info.name,
        "init_sha256": identity["init_sha256"],
    }
    metrics = {
        "train_loss": last.loss,
        "test_mse": last.test_mse,
        "test_denoised_accuracy": last.test_denoised_accuracy,
        "train_size": len(data.x),
        "test_size": None if data.test_x is None else len(data.test_x),
        "elapsed_s": elapsed_s,
    }
    return DenoiserInfo(
        format="safetensors",
        input_shape=data.input_shape,
        arch=config.arch,
        sigma=float(config.sigma),
        name=name or f"{data.name}-{config.arch}-{config.objective}-sigma{config.sigma:g}",
        extra={
            "depth": config.depth,
            "width": config.width,
            "objective": config.objective,
            "training": training,
            "metrics": metrics,
            "history": [h.to_dict() for h in history],
        },
    )
