"""The training comparison: each recipe at each σ, certified on a held-out split, side by side.

For every (method, σ) a base classifier is trained on the dataset's training split (all runs
start from the same seeded initial weights and see the same data order; training runs on one
thread, so the weights do not depend on the machine's core count), written as a
self-describing safetensors file, loaded back with ``load_model`` as ``smoothcert certify``
would, and certified on the test split with CERTIFY (n0, n, α; the same noise seed for every
model). Certified accuracy at radius r is the share of test images whose certified class is
right with radius ≥ r. Outputs, under ``out_dir``::

    models/<method>-sigma<σ>.safetensors     the trained models
    certify/<method>-sigma<σ>.tsv            per-image certificates (smoothcert analyze reads them)
    certified_accuracy.md / .tsv             the table
    certified_accuracy.png                   the curves, one panel per σ
    summary.json                             configuration, training metrics, timings, the table

Radii beyond a run's ``radius_cap`` (σ·Φ⁻¹(α^(1/n))) cannot be certified with that n at all;
the table marks them, and a larger ``n`` reaches further.

Importing this module does not import torch (the CLI reads the defaults from it).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smoothcert.service.core.train_config import METHODS, TrainConfig
from smoothcert.service.core.tsv import format_tsv
from smoothcert.worker.data.datasets import Dataset, load_digits
from smoothcert.worker.evaluation import accuracy

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
CURVE_POINTS = 301          # the plotted curves: certified accuracy on a fine grid of radii


@dataclass(frozen=True)
class ExperimentConfig:
    """The grid and its shared settings. The defaults finish in a few minutes on two CPU cores."""

    methods: tuple[str, ...] = METHODS
    sigmas: tuple[float, ...] = (0.25, 0.5)
    radii: tuple[float, ...] = DEFAULT_RADII
    epochs: int = 15
    batch_size: int = 128
    lr: float = 5e-3
    m: int = 4
    epsilon: float = 0.5
    steps: int = 2
    warmup_epochs: int = 3
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    seed: int = 0
    limit: int | None = None          # certify only the first ``limit`` test images

    def train_config(self, method: str, sigma: float) -> TrainConfig:
        return TrainConfig(arch="digits_cnn", method=method, sigma=sigma, epochs=self.epochs,
                           batch_size=self.batch_size, lr=self.lr, m=self.m, epsilon=self.epsilon,
                           steps=self.steps, warmup_epochs=self.warmup_epochs, seed=self.seed)


@dataclass
class ExperimentRow:
    """One trained and certified model."""

    method: str
    sigma: float
    accuracy: list[float]             # certified accuracy at each radius of the config
    curve: list[float]                # ... at each radius of curve_radii(config)
    radius_cap: float
    abstained: float                  # share of test images with no certified class
    clean_accuracy: float | None      # the base classifier on clean test images
    train_s: float
    certify_s: float
    model_path: str
    log_path: str
    training: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperimentResult:
    config: ExperimentConfig
    rows: list[ExperimentRow]
    paths: dict[str, str]
    dataset: str
    test_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "dataset": self.dataset, "test_size": self.test_size,
                "paths": self.paths, "rows": [asdict(r) for r in self.rows]}


def run_experiment(config: ExperimentConfig, out_dir: str | Path, *, data: Dataset | None = None,
                   device: str = "cpu", step: Callable[[str], None] | None = None) -> ExperimentResult:
    """Train and certify every (method, σ) of ``config`` on ``data`` (digits by default) and
    write the outputs listed in the module docstring. ``step(description)`` is called before each
    training and each certification (2 per model)."""
    from smoothcert.models.loaders import load_model
    from smoothcert.models.reproducible import single_threaded  # torch: only when an experiment runs
    from smoothcert.worker.smoothing import certify
    from smoothcert.worker.training.trainer import train

    data = data or load_digits()
    if data.test_x is None:
        raise ValueError(f"{data.name} has no test split to certify")
    test_x, test_y = data.test_x[:config.limit], data.test_y[:config.limit]
    out = Path(out_dir)
    for folder in ("models", "certify"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for sigma in config.sigmas:
        for method in config.methods:
            tag = f"{method}-sigma{sigma:g}"
            if step:
                step(f"train {method} σ={sigma:g}")
            tick = time.perf_counter()
            with single_threaded():
                trained = train(config.train_config(method, sigma), data, device=device, name=f"{data.name}-{tag}")
            train_s = time.perf_counter() - tick
            model_path = trained.save(out / "models" / f"{tag}.safetensors")
            if step:
                step(f"certify {method} σ={sigma:g}")
            model = load_model(model_path, device=device)
            run = certify(model, test_x, sigma=sigma, n0=config.n0, n=config.n, alpha=config.alpha,
                          seed=config.seed)
            results = [r.to_dict() for r in run.results]
            log_path = out / "certify" / f"{tag}.tsv"
            log_path.write_text(format_tsv(results, test_y.tolist()))
            rows.append(ExperimentRow(
                method=method, sigma=sigma, accuracy=certified_accuracy(results, test_y, config.radii),
                curve=certified_accuracy(results, test_y, curve_radii(config)),
                radius_cap=results[0]["radius_cap"], abstained=float(np.mean([r["abstained"] for r in results])),
                clean_accuracy=trained.metrics["test_clean_accuracy"], train_s=train_s,
                certify_s=run.provenance["elapsed_s"], model_path=str(model_path), log_path=str(log_path),
                training=trained.info.extra["training"]))
    paths = {"table_md": str(out / "certified_accuracy.md"), "table_tsv": str(out / "certified_accuracy.tsv"),
             "plot": str(out / "certified_accuracy.png"), "summary": str(out / "summary.json")}
    result = ExperimentResult(config, rows, paths, data.name, len(test_x))
    Path(paths["table_md"]).write_text(render_markdown(result) + "\n")
    Path(paths["table_tsv"]).write_text(render_tsv(result) + "\n")
    plot_curves(result, paths["plot"])
    Path(paths["summary"]).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def certified_accuracy(results: list[dict], labels: np.ndarray, radii) -> list[float]:
    """Share of inputs certified with the right class at radius ≥ r, for each r (accuracy.py)."""
    correct = [r["prediction"] == int(y) for r, y in zip(results, labels)]
    return accuracy.certified_accuracy(correct, [r["radius"] for r in results], radii).tolist()


def curve_radii(config: ExperimentConfig) -> list[float]:
    """The fine grid of radii the curves are drawn on, from 0 to the largest table radius."""
    return np.linspace(0.0, max(config.radii), CURVE_POINTS).tolist()


def _label(r: float) -> str:
    return f"{r:g}"


def render_markdown(result: ExperimentResult) -> str:
    """The table: one row per (method, σ), certified accuracy in percent at each radius; a cell
    beyond the run's radius cap shows ``–`` (no input could be certified there with this n)."""
    radii = result.config.radii
    lines = ["| method | σ | " + " | ".join(_label(r) for r in radii) + " |",
             "|---|---|" + "---|" * len(radii)]
    for row in result.rows:
        cells = [f"{100 * a:.1f}" if r <= row.radius_cap else "–" for r, a in zip(radii, row.accuracy)]
        lines.append(f"| {row.method} | {row.sigma:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_tsv(result: ExperimentResult) -> str:
    """The table as TSV: method, sigma, radius_cap, then the fraction at each radius."""
    lines = ["\t".join(["method", "sigma", "radius_cap", *(_label(r) for r in result.config.radii)])]
    lines += ["\t".join([row.method, repr(row.sigma), repr(row.radius_cap), *map(repr, row.accuracy)])
              for row in result.rows]
    return "\n".join(lines)


def plot_curves(result: ExperimentResult, out_png: str | Path) -> None:
    """One PNG: a panel per σ, certified accuracy against radius, one curve per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sigmas = sorted({row.sigma for row in result.rows})
    fig = Figure(figsize=(5.0 * len(sigmas), 4.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sigmas), sharey=True, squeeze=False)[0]
    radii = curve_radii(result.config)
    for ax, sigma in zip(axes, sigmas):
        for row in (r for r in result.rows if r.sigma == sigma):
            ax.plot(radii, row.curve, label=row.method)
        ax.axvline(min(r.radius_cap for r in result.rows if r.sigma == sigma), color="grey",
                   linestyle=":", linewidth=1, label="radius cap")
        ax.set_title(f"σ = {sigma:g}")
        ax.set_xlabel("radius (ℓ₂)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("certified accuracy")
    axes[-1].legend(fontsize="small")
    fig.suptitle(f"{result.dataset} test split ({result.test_size} images), n = {result.config.n}, "
                 f"α = {result.config.alpha:g}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(out_png, format="png", dpi=110)
