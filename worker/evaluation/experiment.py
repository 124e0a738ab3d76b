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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smoothcert.service.core.accuracy import certified_accuracy
from smoothcert.service.core.train_config import METHODS, TrainConfig
from smoothcert.service.core.tsv import format_tsv
from smoothcert.worker.data.datasets import Dataset, load_digits

TABLE_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # the table's columns (--radii)
CURVE_POINTS = 301  # the plotted curves: certified accuracy on a fine grid of radii


@dataclass(frozen=True)
class ExperimentConfig:
    """The grid and its shared settings. The defaults finish in a few minutes on two CPU cores."""

    methods: tuple[str, ...] = METHODS[
        :3
    ]  # the noise-training recipes; add "standard" for a baseline
    sigmas: tuple[float, ...] = (0.25, 0.5)
    radii: tuple[float, ...] = TABLE_RADII
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
    limit: int | None = None  # certify only the first ``limit`` test images

    def train_config(self, method: str, sigma: float) -> TrainConfig:
        return TrainConfig(
            arch="digits_cnn",
            method=method,
            sigma=sigma,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            m=self.m,
            epsilon=self.epsilon,
            steps=self.steps,
            warmup_epochs=self.warmup_epochs,
            seed=self.seed,
        )


@dataclass
class ExperimentRow:
    """One trained and certified model."""

    method: str
    sigma: float
    accuracy: list[float]  # certified accuracy at each radius of the config
    curve: list[float]  # ... at each radius of curve_radii(config)
    radius_cap: float
    abstained: float  # share of test images with no certified class
    clean_accuracy: float | None  # the base classifier on clean test images
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
        return {
            "config": asdict(self.config),
            "dataset": self.dataset,
            "test_size": self.test_size,
            "paths": self.paths,
            "rows": [asdict(r) for r in self.rows],
        }


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | Path,
    *,
    data: Dataset | None = None,
    device: str = "cpu",
    step: Callable[[str], None] | None = None,
) -> ExperimentResult:
    """Train and certify every (method, σ) of ``config`` on ``data`` (digits by default) and
    write the outputs listed in the module docstring. ``step(description)`` is called before each
    training and each certification (2 per model)."""
    from smoothcert.models.loaders import load_model
    from smoothcert.models.reproducible import (
        single_threaded,
    )  # torch: only when an experiment runs
    from smoothcert.worker.training.trainer import train

    data = data or load_digits()
    if data.test_x is None or data.test_y is None:  # a Dataset has both or neither
        raise ValueError(f"{data.name} has no test split to certify")
    test_x, test_y = data.test_x[: config.limit], data.test_y[: config.limit]
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
                trained = train(
                    config.train_config(method, sigma),
                    data,
                    device=device,
                    name=f"{data.name}-{tag}",
                )
            train_s = time.perf_counter() - tick
            model_path = trained.save(out / "models" / f"{tag}.safetensors")
            if step:
                step(f"certify {method} σ={sigma:g}")
            model = load_model(model_path, device=device)
            log_path = out / "certify" / f"{tag}.tsv"
            certified = certify_split(
                model,
                test_x,
                test_y,
                log_path,
                sigma=sigma,
                n0=config.n0,
                n=config.n,
                alpha=config.alpha,
                seed=config.seed,
                radii=config.radii,
            )
            rows.append(
                ExperimentRow(
                    method=method,
                    sigma=sigma,
                    accuracy=certified.accuracy,
                    curve=certified.curve,
                    radius_cap=certified.radius_cap,
                    abstained=certified.abstained,
                    clean_accuracy=trained.metrics["test_clean_accuracy"],
                    train_s=train_s,
                    certify_s=certified.certify_s,
                    model_path=str(model_path),
                    log_path=str(log_path),
                    training=trained.info.extra["training"],
                )
            )
    paths = output_paths(out)
    result = ExperimentResult(config, rows, paths, data.name, len(test_x))
    write_outputs(
        paths,
        render_markdown(result),
        render_tsv(result),
        lambda png: plot_curves(result, png),
        result.to_dict(),
    )
    return result


@dataclass
class Certified:
    """One model certified on the test split: the table's and the curve's certified accuracies,
    the radius cap, the share of abstentions and the engine's elapsed time."""

    accuracy: list[float]
    curve: list[float]
    radius_cap: float
    abstained: float
    certify_s: float


def certify_split(
    model,
    x: np.ndarray,
    y: np.ndarray,
    log_path: Path,
    *,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    seed: int,
    radii: Sequence[float],
) -> Certified:
    """CERTIFY ``model`` (a loaded base classifier or pipeline) on ``x`` as `smoothcert certify`
    does with the same parameters and seed, write the per-image TSV (with the labels ``y``) to
    ``log_path``, and measure certified accuracy at ``radii`` and on the curves' grid."""
    from smoothcert.worker.smoothing import RunOptions, certify  # torch: only when run

    run = certify(model, x, sigma=sigma, n0=n0, n=n, alpha=alpha, options=RunOptions(seed=seed))
    results = [r.to_dict() for r in run.results]
    log_path.write_text(format_tsv(results, y.tolist()))
    return Certified(
        accuracy=certified_accuracy_of_results(results, y, radii),
        curve=certified_accuracy_of_results(results, y, curve_grid(radii)),
        radius_cap=results[0]["radius_cap"],
        abstained=float(np.mean([r["abstained"] for r in results])),
        certify_s=run.provenance["elapsed_s"],
    )


def certified_accuracy_of_results(
    results: list[dict], labels: np.ndarray, radii: Sequence[float]
) -> list[float]:
    """Share of the engine's ``results`` (``Certificate.to_dict()`` rows) certified with their
    ``labels``' class at radius ≥ r, for each r in ``radii`` (service/core/accuracy.py)."""
    correct = [r["prediction"] == int(y) for r, y in zip(results, labels)]
    return certified_accuracy(correct, [r["radius"] for r in results], radii).tolist()


def curve_radii(config: ExperimentConfig) -> list[float]:
    """The fine grid of radii the curves are drawn on, from 0 to the largest table radius."""
    return curve_grid(config.radii)


def curve_grid(radii: Sequence[float]) -> list[float]:
    """:data:`CURVE_POINTS` radii from 0 to the largest of ``radii``."""
    return np.linspace(0.0, max(radii), CURVE_POINTS).tolist()


def _label(r: float) -> str:
    return f"{r:g}"


def output_paths(out: Path) -> dict[str, str]:
    """Where the table, the curves and the summary of an experiment in ``out`` go."""
    return {
        "table_md": str(out / "certified_accuracy.md"),
        "table_tsv": str(out / "certified_accuracy.tsv"),
        "plot": str(out / "certified_accuracy.png"),
        "summary": str(out / "summary.json"),
    }


def write_outputs(
    paths: dict[str, str],
    markdown: str,
    tsv: str,
    plot: Callable[[str], None],
    summary: dict[str, Any],
) -> None:
    """Write the table (Markdown and TSV), the curves (``plot(png_path)``) and the summary JSON."""
    Path(paths["table_md"]).write_text(markdown + "\n")
    Path(paths["table_tsv"]).write_text(tsv + "\n")
    plot(paths["plot"])
    Path(paths["summary"]).write_text(json.dumps(summary, indent=2) + "\n")


TableRow = tuple[Sequence[str], Sequence[float], float]
"""One line of a table: its leading cells, certified accuracy at each radius, its radius cap."""


def markdown_table(heads: Sequence[str], rows: Sequence[TableRow], radii: Sequence[float]) -> str:
    """Columns ``heads`` then one per radius, certified accuracy in percent; a cell beyond the
    row's radius cap shows ``–`` (no input could be certified there with this n)."""
    lines = [
        "| " + " | ".join([*heads, *(_label(r) for r in radii)]) + " |",
        "|" + "---|" * (len(heads) + len(radii)),
    ]
    for cells, accuracies, cap in rows:
        values = [f"{100 * a:.1f}" if r <= cap else "–" for r, a in zip(radii, accuracies)]
        lines.append("| " + " | ".join([*cells, *values]) + " |")
    return "\n".join(lines)


def tsv_table(heads: Sequence[str], rows: Sequence[TableRow], radii: Sequence[float]) -> str:
    """Columns ``heads``, radius_cap, then the fraction at each radius (floats at full precision)."""
    lines = ["\t".join([*heads, "radius_cap", *(_label(r) for r in radii)])]
    lines += [
        "\t".join([*cells, repr(cap), *map(repr, accuracies)]) for cells, accuracies, cap in rows
    ]
    return "\n".join(lines)


def render_markdown(result: ExperimentResult) -> str:
    """The table: one row per (method, σ), certified accuracy in percent at each radius; a cell
    beyond the run's radius cap shows ``–`` (no input could be certified there with this n)."""
    return markdown_table(
        ["method", "σ"],
        [([row.method, f"{row.sigma:g}"], row.accuracy, row.radius_cap) for row in result.rows],
        result.config.radii,
    )


def render_tsv(result: ExperimentResult) -> str:
    """The table as TSV: method, sigma, radius_cap, then the fraction at each radius."""
    return tsv_table(
        ["method", "sigma"],
        [([row.method, repr(row.sigma)], row.accuracy, row.radius_cap) for row in result.rows],
        result.config.radii,
    )


Panel = tuple[str, Sequence[tuple[str, Sequence[float]]], float | None]
"""One panel of curves: its title, (label, certified accuracy on the grid) per curve, the radius
cap to mark (None: no mark)."""


def plot_panels(
    panels: Sequence[Panel], radii: Sequence[float], title: str, out_png: str | Path
) -> None:
    """One PNG of side-by-side panels sharing the y axis: certified accuracy against radius
    (``radii``, the grid the curves were measured on), a dotted line at each panel's radius cap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * len(panels), 4.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (panel_title, curves, cap) in zip(axes, panels):
        for label, curve in curves:
            ax.plot(radii, curve, label=label)
        if cap is not None:
            ax.axvline(cap, color="grey", linestyle=":", linewidth=1, label="radius cap")
        ax.set_title(panel_title)
        ax.set_xlabel("radius (ℓ₂)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("certified accuracy")
    axes[-1].legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(out_png, format="png", dpi=110)


def plot_title(dataset: str, test_size: int, n: int, alpha: float) -> str:
    """The figure's title: the images certified and CERTIFY's sample count and level."""
    return f"{dataset} test split ({test_size} images), n = {n}, α = {alpha:g}"


def plot_curves(result: ExperimentResult, out_png: str | Path) -> None:
    """One PNG: a panel per σ, certified accuracy against radius, one curve per method."""
    sigmas = sorted({row.sigma for row in result.rows})
    panels = [
        (
            f"σ = {sigma:g}",
            [(row.method, row.curve) for row in result.rows if row.sigma == sigma],
            min(row.radius_cap for row in result.rows if row.sigma == sigma),
        )
        for sigma in sigmas
    ]
    plot_panels(
        panels,
        curve_radii(result.config),
        plot_title(result.dataset, result.test_size, result.config.n, result.config.alpha),
        out_png,
    )
