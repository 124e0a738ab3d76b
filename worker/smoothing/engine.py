"""Randomized smoothing, batched: CERTIFY and PREDICT of Cohen, Rosenfeld & Kolter (2019).

The smoothed classifier is g(x) = argmax_c P(f(x + δ) = c), δ ~ N(0, σ²I), with the noise added
in [0,1] pixel space (the base classifier normalises after it) and never clamped.

Sampling (`sampling.Sampler`) is separate from the statistics (`bounds` for a fixed n,
`sequential` for the anytime-valid test at a target radius). Noise is drawn on the model's
device from a generator seeded per call; the samples of several inputs share a batch; votes are
counted on the device. Same seed, same batch size and same device give bit-identical counts.

This module does not import Celery: the CLI, the worker tasks and the benchmarks all call it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from smoothcert.models.base import BaseClassifier
from smoothcert.worker.smoothing import bounds
from smoothcert.worker.smoothing.sampling import (  # noqa: F401  (re-exported for callers of the engine)
    CancelCheck, Canceled, InputError, Progress, Sampler, as_input_batch, default_batch_size)


class Answer:
    """What every per-input answer shares: no prediction means the run abstained."""

    prediction: int | None

    @property
    def abstained(self) -> bool:
        return self.prediction is None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "abstained": self.abstained}


@dataclass
class Certificate(Answer):
    """CERTIFY's answer for one input.

    With probability ≥ 1 − alpha over the sampling, the smoothed classifier predicts
    ``prediction`` everywhere within ℓ₂ distance ``radius`` of the input. ``prediction`` is None
    (and ``radius`` 0) when the run abstains. ``elapsed_s`` is the input's share of the run's
    wall time (inputs share batches).
    """

    index: int
    prediction: int | None
    radius: float
    p_a_lower: float
    n_a: int
    n: int
    radius_cap: float
    elapsed_s: float
    p_b_upper: float | None = None   # the top2 bound only

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if self.p_b_upper is None:
            del d["p_b_upper"]
        return d


@dataclass
class Prediction(Answer):
    """PREDICT's answer for one input: the class (None on abstain) and the binomial test behind it.

    If the smoothed classifier's top class is c, the probability that ``prediction`` is a class
    other than c is at most alpha.
    """

    index: int
    prediction: int | None
    p_value: float
    n_a: int
    n_b: int
    n: int
    elapsed_s: float


@dataclass
class Run:
    """Results of one call, in input order, and the provenance that makes them reproducible."""

    results: list[Any]
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"results": [r.to_dict() for r in self.results], "provenance": self.provenance}


def certify(
    model: BaseClassifier,
    x,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int | None = None,
    seed: int | None = None,
    bound: str = "cohen",
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
    target_radius: float | None = None,
    beta: float | None = None,
) -> Run:
    """CERTIFY every input of ``x`` ((C, H, W) or (N, C, H, W), floats in [0,1]).

    Per input: the class with most votes among n0 noisy copies is selected, then n fresh copies
    bound its probability (``bound`` "cohen": Clopper–Pearson at alpha; "top2": the two-class
    bound of ``bounds.top2_radius``). Each returned :class:`Certificate` holds with probability
    ≥ 1 − alpha. ``progress(done, total)`` (in samples) and ``should_cancel()`` run between batches.

    With ``target_radius`` r the question is only "certified at r?": the anytime-valid test of
    :mod:`~smoothcert.worker.smoothing.sequential` draws until it knows (n is then the cap per input, and
    ``beta`` the level of its futility stop, alpha by default) and returns
    :class:`~smoothcert.worker.smoothing.sequential.RadiusDecision` rows.
    """
    _check_params(sigma=sigma, alpha=alpha, n=n, n0=n0, bound=bound)
    if target_radius is not None:
        from smoothcert.worker.smoothing.sequential import certify_at_radius

        return certify_at_radius(model, x, sigma, target_radius, n0=n0, n_max=n, alpha=alpha,
                                 beta=alpha if beta is None else beta, batch_size=batch_size, seed=seed,
                                 progress=progress, should_cancel=should_cancel)
    sampler = Sampler(model, x, sigma, batch_size, seed, progress, should_cancel)
    selection, counts = sampler.counts((n0, n))
    c_hat = selection.argmax(axis=1)
    n_a = counts[np.arange(len(c_hat)), c_hat]
    p_b_upper = None
    if bound == "cohen":
        p_a_lower, radius, abstained = bounds.cohen_radius(n_a, n, alpha, sigma)
    else:
        p_a_lower, p_b_upper, radius, abstained = bounds.top2_radius(counts, c_hat, alpha, sigma)
    cap = bounds.radius_cap(n, alpha, sigma, bound, model.info.num_classes)
    per_input = sampler.elapsed() / len(c_hat)
    results = [
        Certificate(
            index=i,
            prediction=None if abstained[i] else int(c_hat[i]),
            radius=float(radius[i]),
            p_a_lower=float(p_a_lower[i]),
            n_a=int(n_a[i]),
            n=n,
            radius_cap=cap,
            elapsed_s=per_input,
            p_b_upper=None if p_b_upper is None else float(p_b_upper[i]),
        )
        for i in range(len(c_hat))
    ]
    params = {"mode": "certify", "sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "bound": bound}
    return Run(results, sampler.provenance(params))


def predict(
    model: BaseClassifier,
    x,
    sigma: float,
    n: int = 1_000,
    alpha: float = 0.001,
    batch_size: int | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
) -> Run:
    """PREDICT every input of ``x``: the top class of n noisy copies, or an abstention.

    Abstains when the two-sided binomial test of the top two counts n_a ≥ n_b at p = ½ gives a
    p-value above alpha; a returned class differs from g(x) with probability ≤ alpha. Refuses an
    n so small that even a unanimous vote could not pass that test.
    """
    _check_params(sigma=sigma, alpha=alpha, n=n)
    least = bounds.min_predict_n(alpha)
    if n < least:
        raise InputError(f"n={n} can never pass the test at alpha={alpha}: PREDICT needs n >= {least}")
    sampler = Sampler(model, x, sigma, batch_size, seed, progress, should_cancel)
    (counts,) = sampler.counts((n,))
    per_input = sampler.elapsed() / len(counts)
    results = []
    for i, row in enumerate(counts):
        top2 = np.argsort(row, kind="stable")[::-1][:2]
        n_a, n_b = int(row[top2[0]]), int(row[top2[1]]) if len(row) > 1 else 0
        p_value = bounds.predict_p_value(n_a, n_b)
        results.append(
            Prediction(
                index=i,
                prediction=None if p_value > alpha else int(top2[0]),
                p_value=p_value,
                n_a=n_a,
                n_b=n_b,
                n=n,
                elapsed_s=per_input,
            )
        )
    return Run(results, sampler.provenance({"mode": "predict", "sigma": sigma, "n": n, "alpha": alpha}))


def _check_params(*, sigma: float, alpha: float, n: int, n0: int = 1, bound: str = "cohen") -> None:
    if not (isinstance(sigma, (int, float)) and np.isfinite(sigma) and sigma > 0):
        raise InputError(f"sigma must be a positive number, got {sigma!r}")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise InputError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    for name, value in (("n0", n0), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if bound not in bounds.BOUNDS:
        raise InputError(f"bound must be one of {', '.join(bounds.BOUNDS)}, got {bound!r}")
