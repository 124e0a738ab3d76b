"""The denoised-smoothing comparison: a classifier that never saw noise, alone and behind denoisers.

At one σ, on the dataset's training split, the models each row needs are trained in this process
(one thread, so the weights do not depend on the machine's core count), written as
self-describing safetensors files, loaded back with the loaders `smoothcert certify` uses
(``load_model``, ``load_denoiser``, ``compose``) and certified on the test split with CERTIFY
(n0, n, α, the same noise seed for every row). The rows, in :data:`ROWS` order:

    gaussian    a classifier trained with Gaussian noise at σ (what noise training gives)
    standard    a classifier trained without noise, certified alone
    mse         standard behind a DnCNN trained with MSE
    stability   standard behind that MSE denoiser fine-tuned with the stability objective
                (batch 32, lr 3e-4 by default: the recipe that met issue 15's target)
    diffusion   standard behind a one-step diffusion denoiser
                (:func:`smoothcert.worker.training.diffusion.train_diffusion`)

A row trains what it stands on: ``stability`` alone trains the standard classifier and the MSE
denoiser too (written under models/, not certified), so no row can lack a part. Outputs, under
``out_dir``, as :mod:`.experiment` writes them::

    models/<model>.safetensors       gaussian, standard, mse, stability, diffusion (as needed)
    certify/<row>.tsv                per-image certificates (smoothcert analyze reads them)
    certified_accuracy.md / .tsv     the table, rows × radii
    certified_accuracy.png           the curves, one per row
    summary.json                     configuration, each model's training record and time, the rows, the table

Importing this module does not import torch (the CLI reads the defaults from it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from smoothcert.service.core.train_config import DenoiserConfig, DiffusionConfig, TrainConfig
from smoothcert.worker.data.datasets import Dataset, load_digits
from smoothcert.worker.evaluation.experiment import (
    certify_split,
    curve_grid,
    markdown_table,
    output_paths,
    plot_panels,
    plot_title,
    tsv_table,
    write_outputs,
)

ROWS = ("gaussian", "standard", "mse", "stability", "diffusion")
LABELS = {
    "gaussian": "gaussian",
    "standard": "standard",
    "mse": "standard + mse",
    "stability": "standard + stability",
    "diffusion": "standard + diffusion",
}
# What each row certifies: its classifier, and the denoiser in front of it (None: the classifier alone).
PARTS: dict[str, tuple[str, str | None]] = {
    "gaussian": ("gaussian", None),
    "standard": ("standard", None),
    "mse": ("standard", "mse"),
    "stability": ("standard", "stability"),
    "diffusion": ("standard", "diffusion"),
}
# What each model's training needs first: the stability objective fine-tunes the MSE denoiser for
# the standard classifier, and the MSE denoiser is measured with that classifier while it trains.
# A model is named after the row that certifies it first, and ROWS order trains each after its needs.
NEEDS: dict[str, tuple[str, ...]] = {
    "gaussian": (),
    "standard": (),
    "mse": ("standard",),
    "stability": ("standard", "mse"),
    "diffusion": (),
}
TABLE_RADII = (0.0, 0.25, 0.5, 0.75)  # the table's columns (--radii)


def check_rows(rows: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``rows`` in :data:`ROWS` order, once each; ValueError naming the allowed rows otherwise."""
    wrong = [r for r in rows if r not in ROWS]
    if wrong or not rows:
        raise ValueError(
            f"rows: {', '.join(map(str, wrong)) or 'nothing given'}; choose from {', '.join(ROWS)}"
        )
    return tuple(r for r in ROWS if r in rows)


def models_for(rows: tuple[str, ...]) -> list[str]:
    """The models the rows need, in the order they are trained (every model after what it needs)."""
    wanted: set[str] = set()
    for row in check_rows(rows):
        classifier, denoiser = PARTS[row]
        for model in (classifier, denoiser):
            if model is not None:
                wanted.update((model, *NEEDS[model]))
    return [m for m in ROWS if m in wanted]


def plan(rows: tuple[str, ...]) -> list[str]:
    """The steps :func:`run_denoised_experiment` reports, in order: each row's certification
    after the trainings it is the first to need."""
    steps, trained = [], set()
    for row in check_rows(rows):
        for model in models_for((row,)):
            if model not in trained:
                steps.append(f"train {model}")
                trained.add(model)
        steps.append(f"certify {LABELS[row]}")
    return steps


@dataclass(frozen=True)
class DenoisedConfig:
    """The comparison's settings. The defaults are issue 15's: σ = 0.5, classifiers 40 epochs,
    denoisers 60, n0 = 100, n = 1,000, α = 0.001, the first 300 test images, seed 0.

    ``epochs``, ``batch_size`` and ``lr`` train both classifiers (Adam, cosine schedule). The
    MSE denoiser trains ``denoiser_epochs`` with ``mse_batch_size`` and ``mse_lr``; the stability
    denoiser starts from it and trains ``denoiser_epochs`` more with ``stability_batch_size`` and
    ``stability_lr``; both are DnCNNs of ``depth`` and ``width``. The diffusion denoiser trains
    ``diffusion_epochs`` (None: DiffusionConfig's default). Every training and the certification
    use ``seed``.
    """

    rows: tuple[str, ...] = ROWS
    sigma: float = 0.5
    radii: tuple[float, ...] = TABLE_RADII
    epochs: int = 40
    batch_size: int = 128
    lr: float = 5e-3
    denoiser_epochs: int = 60
    mse_batch_size: int = 128
    mse_lr: float = 1e-3
    stability_batch_size: int = 32
    stability_lr: float = 3e-4
    depth: int = 6
    width: int = 32
    diffusion_epochs: int | None = None
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    seed: int = 0
    limit: int | None = 300  # certify only the first ``limit`` test images (None: all)

    def __post_init__(self) -> None:
        """Refuse a setting that a training would refuse before anything is trained (ValueError)."""
        object.__setattr__(self, "rows", check_rows(self.rows))
        self.train_config("gaussian")
        for objective in ("mse", "stability"):
            self.denoiser_config(objective)
        if self.limit is not None and not (isinstance(self.limit, int) and self.limit >= 1):
            raise ValueError(f"limit must be a positive integer or None, not {self.limit!r}")

    def train_config(self, method: str) -> TrainConfig:
        """A classifier's training: ``gaussian`` at σ, or ``standard`` (σ only sets its noisy test accuracy)."""
        return TrainConfig(
            arch="digits_cnn",
            method=method,
            sigma=self.sigma,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed,
        )

    def denoiser_config(self, objective: str) -> DenoiserConfig:
        batch_size, lr = (
            (self.mse_batch_size, self.mse_lr)
            if objective == "mse"
            else (self.stability_batch_size, self.stability_lr)
        )
        return DenoiserConfig(
            objective=objective,
            sigma=self.sigma,
            epochs=self.denoiser_epochs,
            batch_size=batch_size,
            lr=lr,
            depth=self.depth,
            width=self.width,
            seed=self.seed,
        )


@dataclass
class TrainedModel:
    """One trained file: its path, how long training took, and the training record its metadata holds."""

    model: str
    path: str
    train_s: float
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class DenoisedRow:
    """One certified row: the classifier and the denoiser (None: alone) it certifies."""

    row: str
    label: str
    classifier: str
    denoiser: str | None
    accuracy: list[float]  # certified accuracy at each radius of the config
    curve: list[float]  # ... at each radius of curve_grid(config.radii)
    radius_cap: float
    abstained: float
    certify_s: float
    log_path: str


@dataclass
class DenoisedResult:
    """The trained models (by name), the certified rows in :data:`ROWS` order, and the output paths."""

    config: DenoisedConfig
    models: dict[str, TrainedModel]
    rows: list[DenoisedRow]
    paths: dict[str, str]
    dataset: str
    test_size: int
    elapsed_s: float = 0.0

    def table(self) -> list[dict[str, Any]]:
        """The table as records, one per row, with the TSV's columns and values."""
        return [
            {
                "row": r.label,
                "sigma": self.config.sigma,
                "radius_cap": r.radius_cap,
                **{f"{radius:g}": a for radius, a in zip(self.config.radii, r.accuracy)},
            }
            for r in self.rows
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "dataset": self.dataset,
            "test_size": self.test_size,
            "paths": self.paths,
            "elapsed_s": self.elapsed_s,
            "models": {k: asdict(m) for k, m in self.models.items()},
            "rows": [asdict(r) for r in self.rows],
            "table": self.table(),
        }


def run_denoised_experiment(
    config: DenoisedConfig,
    out_dir: str | Path,
    *,
    data: Dataset | None = None,
    device: str = "cpu",
    step: Callable[[str], None] | None = None,
) -> DenoisedResult:
    """Train what ``config.rows`` need on ``data`` (digits by default), certify each row on its
    test split and write the outputs listed in the module docstring. ``step(description)`` is
    called before each training and each certification, as :func:`plan` lists them."""
    from smoothcert.worker.smoothing.checks import (
        check_params,
    )  # torch: only when an experiment runs

    check_params(
        sigma=config.sigma,
        alpha=config.alpha,
        n0=config.n0,
        n=config.n,
        bound="cohen",
        seed=config.seed,
    )
    started = time.perf_counter()
    data = data or load_digits()
    if data.test_x is None or data.test_y is None:  # a Dataset has both or neither
        raise ValueError(f"{data.name} has no test split to certify")
    test_x, test_y = data.test_x[: config.limit], data.test_y[: config.limit]
    if "diffusion" in models_for(config.rows):
        diffusion_config(config, data.name)
    out = Path(out_dir)
    for folder in ("models", "certify"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    trainer = _Trainer(config, data, out / "models", device)
    rows = []
    for row in config.rows:
        for model in models_for((row,)):
            if model not in trainer.trained:
                if step:
                    step(f"train {model}")
                trainer.train(model)
        if step:
            step(f"certify {LABELS[row]}")
        classifier, denoiser = PARTS[row]
        log_path = out / "certify" / f"{row}.tsv"
        certified = certify_split(
            trainer.load(classifier, denoiser),
            test_x,
            test_y,
            log_path,
            sigma=config.sigma,
            n0=config.n0,
            n=config.n,
            alpha=config.alpha,
            seed=config.seed,
            radii=config.radii,
        )
        rows.append(
            DenoisedRow(
                row=row,
                label=LABELS[row],
                classifier=classifier,
                denoiser=denoiser,
                accuracy=certified.accuracy,
                curve=certified.curve,
                radius_cap=certified.radius_cap,
                abstained=certified.abstained,
                certify_s=certified.certify_s,
                log_path=str(log_path),
            )
        )
    paths = output_paths(out)
    result = DenoisedResult(config, trainer.trained, rows, paths, data.name, len(test_x))
    result.elapsed_s = time.perf_counter() - started
    write_outputs(
        paths,
        render_markdown(result),
        render_tsv(result),
        lambda png: plot_curves(result, png),
        result.to_dict(),
    )
    return result


def diffusion_config(config: DenoisedConfig, dataset: str) -> DiffusionConfig:
    """The diffusion denoiser's DiffusionConfig (``diffusion_epochs``, else its default epochs;
    ``seed``); TrainingError where DiffusionConfig refuses the settings, before anything is trained."""
    given: dict[str, Any] = {"seed": config.seed, "name": f"{dataset}-diffusion"}
    if config.diffusion_epochs is not None:
        given["epochs"] = config.diffusion_epochs
    return DiffusionConfig(**given)


class _Trainer:
    """Trains each model once, into ``models_dir``, and loads trained files back as the CLI does."""

    def __init__(self, config: DenoisedConfig, data: Dataset, models_dir: Path, device: str):
        self.config, self.data, self.dir, self.device = config, data, models_dir, device
        self.trained: dict[str, TrainedModel] = {}

    def path(self, model: str) -> Path:
        return self.dir / f"{model}.safetensors"

    def train(self, model: str) -> None:
        from smoothcert.models.reproducible import (
            single_threaded,
        )  # torch: only when an experiment runs

        tick = time.perf_counter()
        with single_threaded():
            if model in ("gaussian", "standard"):
                self._train_classifier(model)
            elif model in ("mse", "stability"):
                self._train_denoiser(model)
            else:
                self._train_diffusion()
        train_s = time.perf_counter() - tick
        info = self._load_part(model).info
        self.trained[model] = TrainedModel(
            model=model,
            path=str(self.path(model)),
            train_s=train_s,
            training=info.extra.get("training", {}),
            metrics=info.extra.get("metrics", {}),
        )

    def _train_classifier(self, method: str) -> None:
        from smoothcert.worker.training.trainer import train

        trained = train(
            self.config.train_config(method),
            self.data,
            device=self.device,
            name=f"{self.data.name}-{method}",
        )
        trained.save(self.path(method))

    def _train_denoiser(self, objective: str) -> None:
        from smoothcert.worker.training.denoiser import train_denoiser

        init = self._load_part("mse") if objective == "stability" else None
        trained = train_denoiser(
            self.config.denoiser_config(objective),
            self.data,
            self._load_part("standard"),
            device=self.device,
            name=f"{self.data.name}-dncnn-{objective}",
            init=init,
        )
        trained.save(self.path(objective))

    def _train_diffusion(self) -> None:
        from smoothcert.worker.training.diffusion import train_diffusion

        train_diffusion(
            diffusion_config(self.config, self.data.name),
            self.data,
            self.path("diffusion"),
            device=self.device,
        )

    def _load_part(self, model: str):
        """A trained file through the CLI's loaders: ``load_model`` (classifiers), ``load_denoiser`` (denoisers)."""
        from smoothcert.models.denoisers import load_denoiser
        from smoothcert.models.loaders import load_model

        if model in ("gaussian", "standard"):
            return load_model(self.path(model), device=self.device)
        return load_denoiser(self.path(model), device=self.device)

    def load(self, classifier: str, denoiser: str | None):
        """What a row certifies: the classifier, or ``compose(denoiser, classifier)``."""
        from smoothcert.models.pipeline import compose

        model = self._load_part(classifier)
        return model if denoiser is None else compose(self._load_part(denoiser), model)


def _table_rows(result: DenoisedResult, label_cell: Callable[[DenoisedRow], list[str]]):
    return [(label_cell(r), r.accuracy, r.radius_cap) for r in result.rows]


def render_markdown(result: DenoisedResult) -> str:
    """The table: one line per row, certified accuracy in percent at each radius (``–`` beyond the cap)."""
    return markdown_table(
        ["base classifier"], _table_rows(result, lambda r: [r.label]), result.config.radii
    )


def render_tsv(result: DenoisedResult) -> str:
    """The table as TSV: row, sigma, radius_cap, then the fraction at each radius (:meth:`DenoisedResult.table`)."""
    return tsv_table(
        ["row", "sigma"],
        _table_rows(result, lambda r: [r.label, repr(result.config.sigma)]),
        result.config.radii,
    )


def plot_curves(result: DenoisedResult, out_png: str | Path) -> None:
    """One panel at σ: certified accuracy against radius, one curve per row; the radius cap is
    marked when it falls within the table's radii (beyond them it would only stretch the axis)."""
    cap = min(r.radius_cap for r in result.rows)
    plot_panels(
        [
            (
                f"σ = {result.config.sigma:g}",
                [(r.label, r.curve) for r in result.rows],
                cap if cap <= max(result.config.radii) else None,
            )
        ],
        curve_grid(result.config.radii),
        plot_title(result.dataset, result.test_size, result.config.n, result.config.alpha),
        out_png,
    )
