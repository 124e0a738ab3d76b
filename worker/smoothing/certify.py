"""CERTIFY and PREDICT of Cohen, Rosenfeld & Kolter (2019), batched over inputs.

The smoothed classifier is g(x) = argmax_c P(f(x + δ) = c), δ ~ N(0, σ²I), with the noise added
in [0,1] pixel space (the base classifier normalises after it) and never clamped; or, with
``noise="discrete"``, the same for F = f∘clip∘round₂₅₅ on inputs of the 8-bit grid, drawn
exactly in integers (:mod:`~smoothcert.worker.smoothing.discrete`). Each function
below follows the paper's pseudocode line by line, for every input of ``x`` at once; sampling is
:mod:`~smoothcert.worker.smoothing.sampling`, the statistics :mod:`~smoothcert.worker.smoothing.bounds`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from smoothcert.models.base import BaseClassifier
from smoothcert.service.core.params import (
    DEFAULT_ALPHA,
    DEFAULT_N,
    DEFAULT_N0,
    DEFAULT_NOISE,
    DEFAULT_PREDICT_N,
    Bound,
    Noise,
)
from smoothcert.worker.smoothing import bounds
from smoothcert.worker.smoothing.checks import InputError, check_params
from smoothcert.worker.smoothing.options import RunOptions
from smoothcert.worker.smoothing.results import Certificate, Prediction, Run
from smoothcert.worker.smoothing.sampling import Counts, Inputs, open_sampler


def certify(
    model: BaseClassifier,
    x: Inputs,
    sigma: float,
    n0: int = DEFAULT_N0,
    n: int = DEFAULT_N,
    alpha: float = DEFAULT_ALPHA,
    *,
    bound: Bound = "cohen",
    options: RunOptions | None = None,
    noise: Noise = DEFAULT_NOISE,
    quantize: bool = False,
) -> Run[Certificate]:
    """CERTIFY every input of ``x`` ((C, H, W) or (N, C, H, W), floats in [0,1]).

    Per input, as in the paper: ĉ_A is the class with most votes among n0 noisy copies; n fresh
    copies give n_A votes for it; p_A_lower is the Clopper–Pearson lower bound on p_A at level
    alpha; abstain when p_A_lower < ½, else the radius is σ·Φ⁻¹(p_A_lower). ``bound="top2"``
    bounds p_A and the runner-up instead (:func:`~smoothcert.worker.smoothing.bounds.top2_radius`).
    With probability ≥ 1 − alpha over the sampling, a :class:`Certificate` that does not abstain
    is right: g predicts ĉ_A everywhere within ℓ₂ distance ``radius`` of the input.
    ``options`` (:class:`RunOptions`; None: its defaults) says how it runs: batch size, seed,
    progress and cancel check between batches, memory budget. A ``batch_size`` larger than fits
    the memory budget is refused with :class:`~.checks.BatchSizeError` (an InputError), or lowered
    to fit when ``options.lower_batch_size``; the provenance records the batch size used and the
    one asked for. Raises InputError when the model's scores are NaN or infinite for some noisy copy.
    ``noise="discrete"`` draws the discretised Gaussian on the 8-bit grid; its inputs must lie on
    the grid (InputError otherwise) unless ``quantize``, which rounds them first. The guarantee
    then holds with probability ≥ 1 − ``alpha_effective`` (the provenance's), for g of F.
    """
    options = options or RunOptions()
    check_params(
        sigma=sigma,
        n0=n0,
        n=n,
        alpha=alpha,
        bound=bound,
        batch_size=options.batch_size,
        seed=options.seed,
    )
    sampler = open_sampler(model, x, sigma, options, noise=noise, quantize=quantize)
    # Two disjoint samples per input: n0 copies to select, n fresh ones to estimate, so the class
    # under test was not chosen on the votes that test it. One call draws both (input by input,
    # selection first), so batches stay full across inputs.
    selection, estimation = sampler.sample_counts(n0, n)
    c_hat = _select(selection)
    est = _estimate(estimation, c_hat, n, alpha, sigma, bound)
    cap = bounds.radius_cap(n, alpha, sigma, bound, model.info.num_classes)
    per_input = sampler.elapsed() / len(c_hat)
    results = [
        Certificate(
            index=i,
            prediction=None if est.abstained[i] else int(c_hat[i]),
            radius=float(est.radius[i]),
            p_a_lower=float(est.p_a_lower[i]),
            n_a=int(est.n_a[i]),
            n=n,
            radius_cap=cap,
            elapsed_s=per_input,
            p_b_upper=None if est.p_b_upper is None else float(est.p_b_upper[i]),
            votes=votes(estimation[i]),
        )
        for i in range(len(c_hat))
    ]
    params = {"mode": "certify", "sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "bound": bound}
    return Run(results, sampler.provenance(params))


def predict(
    model: BaseClassifier,
    x: Inputs,
    sigma: float,
    n: int = DEFAULT_PREDICT_N,
    alpha: float = DEFAULT_ALPHA,
    *,
    options: RunOptions | None = None,
    noise: Noise = DEFAULT_NOISE,
    quantize: bool = False,
) -> Run[Prediction]:
    """PREDICT every input of ``x``: the top class of n noisy copies, or an abstention.

    Abstains when the two-sided binomial test of the top two counts n_A ≥ n_B at p = ½ gives a
    p-value above alpha; a returned class differs from g(x) with probability ≤ alpha. Refuses an
    n so small that even a unanimous vote could not pass that test. ``options``, batches,
    scores, ``noise`` and ``quantize`` as in :func:`certify`.
    """
    options = options or RunOptions()
    check_params(sigma=sigma, n=n, alpha=alpha, batch_size=options.batch_size, seed=options.seed)
    least = bounds.min_predict_n(alpha)
    if n < least:
        raise InputError(
            f"n={n} can never pass the test at alpha={alpha}: PREDICT needs n >= {least}"
        )
    sampler = open_sampler(model, x, sigma, options, noise=noise, quantize=quantize)
    (counts,) = sampler.sample_counts(n)
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
                votes=votes(row),
            )
        )
    return Run(
        results, sampler.provenance({"mode": "predict", "sigma": sigma, "n": n, "alpha": alpha})
    )


def votes(counts: np.ndarray) -> dict[str, int]:
    """One input's counts per class as a sparse map, ``{"<class index>": count}`` without zeros."""
    return {str(c): int(counts[c]) for c in np.flatnonzero(counts)}


def _select(selection: Counts) -> np.ndarray:
    """ĉ_A per input: the class with most votes among the selection copies (the lowest on a tie)."""
    c_hat: np.ndarray = selection.argmax(axis=1)
    return c_hat


class _Estimate(NamedTuple):
    n_a: np.ndarray
    p_a_lower: np.ndarray
    radius: np.ndarray
    abstained: np.ndarray
    p_b_upper: np.ndarray | None  # the top2 bound only


def _estimate(
    estimation: Counts, c_hat: np.ndarray, n: int, alpha: float, sigma: float, bound: Bound
) -> _Estimate:
    """n_A = the votes for ĉ_A among the n estimation copies, and the bound and radius they give."""
    n_a = estimation[np.arange(len(c_hat)), c_hat]
    if bound == "cohen":
        p_a_lower, radius, abstained = bounds.cohen_radius(n_a, n, alpha, sigma)
        return _Estimate(n_a, p_a_lower, radius, abstained, None)
    p_a_lower, p_b_upper, radius, abstained = bounds.top2_radius(estimation, c_hat, alpha, sigma)
    return _Estimate(n_a, p_a_lower, radius, abstained, p_b_upper)
