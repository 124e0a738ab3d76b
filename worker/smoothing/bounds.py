"""The statistics of a certificate (design §2), separate from sampling so it can be read and tested alone.

Every function here is vectorised over inputs: counts may be scalars or arrays.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy.stats import beta, binomtest, norm

from smoothcert.service.core.params import Bound


def lower_confidence_bound(n_a: npt.ArrayLike, n: npt.ArrayLike, alpha: float) -> np.ndarray:
    """One-sided (1 − alpha) Clopper–Pearson lower bound on p from n_a successes in n trials.

    P(p ≥ bound) ≥ 1 − alpha over the n draws. Equals Beta.ppf(alpha, n_a, n − n_a + 1), and is
    exactly 0 when n_a = 0 (scipy would answer NaN there).
    """
    n_a, n = np.asarray(n_a, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(alpha, n_a, n - n_a + 1)
    return np.where(n_a > 0, bound, 0.0)


def upper_confidence_bound(k: npt.ArrayLike, n: npt.ArrayLike, alpha: float) -> np.ndarray:
    """One-sided (1 − alpha) Clopper–Pearson upper bound on p from k successes in n trials (1 when k = n)."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(1.0 - alpha, k + 1, n - k)
    return np.where(k < n, bound, 1.0)


def cohen_radius(
    n_a: npt.ArrayLike, n: int, alpha: float, sigma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cohen et al.'s CERTIFY bound: (p_a_lower, radius, abstained).

    With probability ≥ 1 − alpha, p_A ≥ p_a_lower, and then the smoothed classifier's class is
    constant within ℓ₂ radius σ·Φ⁻¹(p_a_lower). Abstain (radius 0) when p_a_lower < ½.
    """
    p_a_lower = lower_confidence_bound(n_a, n, alpha)
    abstained = p_a_lower < 0.5
    with np.errstate(divide="ignore"):
        radius = np.where(abstained, 0.0, sigma * norm.ppf(np.maximum(p_a_lower, 0.5)))
    return p_a_lower, radius, abstained


def top2_radius(
    counts: np.ndarray, c_hat: np.ndarray, alpha: float, sigma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The two-class bound: (p_a_lower, p_b_upper, radius, abstained) for count rows ``counts`` (N, K).

    p_a_lower is taken at alpha/2 for the selected class; each of the K − 1 other classes gets a
    Clopper–Pearson upper bound at alpha/(2(K − 1)), and p_b_upper is the largest of them. By the
    union bound all K bounds hold together with probability ≥ 1 − alpha. Since p_B ≤ 1 − p_A,
    p_b_upper is also capped at 1 − p_a_lower, which costs no extra failure probability.
    Abstain (radius 0) unless p_a_lower > p_b_upper; else radius = σ/2·(Φ⁻¹(p_a_lower) − Φ⁻¹(p_b_upper)).
    """
    counts = np.atleast_2d(counts)
    num_inputs, num_classes = counts.shape
    n = counts.sum(axis=1)
    rows = np.arange(num_inputs)
    n_a = counts[rows, c_hat]
    p_a_lower = lower_confidence_bound(n_a, n, alpha / 2)
    others = counts.astype(np.float64)
    others[rows, c_hat] = -1  # excluded from the max below
    if num_classes > 1:
        per_class = upper_confidence_bound(
            np.maximum(others, 0), n[:, None], alpha / (2 * (num_classes - 1))
        )
        p_b_upper = np.where(others >= 0, per_class, 0.0).max(axis=1)
    else:
        p_b_upper = np.zeros(num_inputs)
    p_b_upper = np.minimum(p_b_upper, 1.0 - p_a_lower)
    abstained = ~(p_a_lower > p_b_upper)
    with np.errstate(divide="ignore", invalid="ignore"):
        radius = sigma / 2 * (norm.ppf(p_a_lower) - norm.ppf(p_b_upper))
    return p_a_lower, p_b_upper, np.where(abstained, 0.0, radius), abstained


def radius_cap(
    n: int, alpha: float, sigma: float, bound: Bound = "cohen", num_classes: int = 2
) -> float:
    """The largest radius the bound can give with n samples: the radius of a unanimous vote.

    For ``cohen`` this is σ·Φ⁻¹(alpha^(1/n)) (3.8115σ at n = 100,000, alpha = 0.001).
    """
    if bound == "cohen":
        return float(sigma * norm.ppf(alpha ** (1.0 / n)))
    counts = np.zeros((1, max(num_classes, 2)), dtype=np.int64)
    counts[0, 0] = n
    return float(top2_radius(counts, np.array([0]), alpha, sigma)[2][0])


def predict_p_value(n_a: int, n_b: int) -> float:
    """Two-sided binomial test p-value of n_a votes out of n_a + n_b at p = ½."""
    if n_a + n_b == 0:
        return 1.0
    return float(binomtest(int(n_a), int(n_a + n_b), 0.5).pvalue)


def min_predict_n(alpha: float) -> int:
    """Smallest n for which a unanimous vote (p-value 2^(1−n)) can pass the test at level alpha."""
    n = max(1, math.ceil(1 - math.log2(alpha)))
    while n > 1 and 2.0 ** (2 - n) <= alpha:  # guard against rounding up one too far
        n -= 1
    while 2.0 ** (1 - n) > alpha:
        n += 1
    return n
