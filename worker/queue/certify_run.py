"""One certify or predict run of a job's inputs: the engine call its parameters make, labels on
the rows, certified-accuracy figures, the noisy copies kept for display, throttled progress.

Shared by the tasks of ordinary jobs and of dataset-job chunks; no Celery, no Redis.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from smoothcert.service.core.accuracy import (
    DEFAULT_CURVE_RADII,
    average_certified_radius,
    certified_accuracy,
)
from smoothcert.service.core.contract import CertifyJob, CertifyParams
from smoothcert.service.core.jobs import SAMPLE_BYTES, SAMPLE_COPIES, SAMPLE_ROWS
from smoothcert.worker import smoothing


def run_engine(
    model,
    x: np.ndarray,
    params: CertifyParams,
    seed: int,
    progress: smoothing.Progress,
    should_cancel: smoothing.CancelCheck,
    memory_budget: int | None = None,
) -> dict[str, Any]:
    """CERTIFY, PREDICT or the test at ``params.target_radius`` of ``x``; ``Run.to_dict()``.
    ``params.n`` caps a target-radius run. ``memory_budget`` bounds a batch's memory (None: the
    engine's share of the device's free memory); a job's ``batch_size`` beyond it is lowered to
    fit, and the provenance records both sizes."""
    options = smoothing.RunOptions(
        batch_size=params.batch_size,
        seed=seed,
        progress=progress,
        should_cancel=should_cancel,
        memory_budget=memory_budget,
        lower_batch_size=True,
    )
    run = smoothing.run_params(model, x, params, options)
    return run.to_dict()


def sample_seed(seed: int, index: int) -> int:
    """The seed of row ``index``'s kept noisy copies: the first 8 bytes of SHA-256(``"<seed>:samples:<index>"``),
    big-endian, >> 1. Not the job's seed, so keeping them changes none of the job's draws."""
    return (
        int.from_bytes(hashlib.sha256(f"{seed}:samples:{index}".encode()).digest()[:8], "big") >> 1
    )


def kept_samples(model, x: np.ndarray, job: CertifyJob, first_index: int) -> dict[int, bytes]:
    """The noisy copies to keep of the inputs ``x`` (rows ``first_index`` on) that are among the job's
    first rows: row index -> ``.npy`` of uint8 (copies, C, H, W), clipped to [0, 1] for display,
    drawn with the job's noise (Gaussian, or discrete on the grid) by the engine's own sampler.

    A job keeps SAMPLE_COPIES copies of its first SAMPLE_ROWS rows, fewer of both where that would
    exceed SAMPLE_BYTES (at least one copy of one row); a dataset job's first row is its ``skip``.
    """
    per_copy = int(np.prod(model.info.input_shape))
    rows = min(SAMPLE_ROWS, max(1, SAMPLE_BYTES // (SAMPLE_COPIES * per_copy)))
    copies = min(SAMPLE_COPIES, max(1, SAMPLE_BYTES // per_copy))
    end = job.first_row + rows
    kept = {}
    for i in range(min(len(x), max(0, end - first_index))):
        noisy = smoothing.noisy_copies(
            x[i : i + 1],
            model.info.input_shape,
            job.params.sigma,
            copies,
            sample_seed(job.seed, first_index + i),
            noise=job.params.noise,
            quantize=job.params.quantize,
        )[0]
        out = io.BytesIO()
        np.save(out, np.rint(np.clip(noisy, 0.0, 1.0) * 255).astype(np.uint8), allow_pickle=False)
        kept[first_index + i] = out.getvalue()
    return kept


def throttled(report: Callable[[int, int], None], every_s: float = 0.25) -> smoothing.Progress:
    """A progress callback that passes on at most one call per ``every_s``, and always the last."""
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] > every_s:
            last[0] = now
            report(done, total)

    return progress


def label_rows(rows: list[dict[str, Any]], labels: Sequence[int] | np.ndarray | None) -> None:
    """Set each row's ``label`` (None without labels)."""
    for i, row in enumerate(rows):
        row["label"] = None if labels is None else int(labels[i])


def label_metrics(
    rows: list[dict[str, Any]], mode: str, radii: Sequence[float] | None
) -> dict[str, Any]:
    """``certified_accuracy`` at ``radii`` and ``acr`` (the average certified radius) for certify,
    ``accuracy`` for predict, of labelled rows; rows of a target-radius run add
    ``certified_accuracy_at_r``: the share certified at r and right."""
    if mode == "certify":
        metrics: dict[str, Any] = {
            "certified_accuracy": certified_accuracy_of_rows(rows, radii or DEFAULT_CURVE_RADII),
            "acr": acr_of_rows(rows),
        }
        if rows and "certified_at_r" in rows[0]:
            metrics["certified_accuracy_at_r"] = float(
                np.mean([r["certified_at_r"] and r["prediction"] == r["label"] for r in rows])
            )
        return metrics
    return {"accuracy": float(np.mean([r["prediction"] == r["label"] for r in rows]))}


def certified_accuracy_of_rows(
    rows: list[dict[str, Any]], radii: Sequence[float]
) -> list[dict[str, float]]:
    """Share of rows predicted right (``prediction == label``) with radius ≥ r, for each r in ``radii``."""
    shares = certified_accuracy(
        [r["prediction"] == r["label"] for r in rows], [r["radius"] for r in rows], radii
    )
    return [{"radius": float(r), "accuracy": float(a)} for r, a in zip(radii, shares)]


def acr_of_rows(rows: list[dict[str, Any]]) -> float:
    """The average certified radius of labelled rows: the mean of ``radius`` where ``prediction ==
    label``, 0 elsewhere (an abstention included)."""
    return average_certified_radius(
        [r["prediction"] is not None and r["prediction"] == r["label"] for r in rows],
        [r["radius"] for r in rows],
    )
