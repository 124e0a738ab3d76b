"""The statistics of a certificate against closed forms (exact; no sampling, no failure probability)."""

import math

import numpy as np
import pytest
from scipy.stats import binom, binomtest, norm

from smoothcert.worker.smoothing import bounds


@pytest.mark.parametrize(
    "n_a,n", [(1, 10), (7, 10), (550, 1000), (99_000, 100_000), (100_000, 100_000)]
)
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_one_sided_lower_bound_is_the_two_sided_interval_at_twice_alpha(n_a, n, alpha):
    two_sided = binomtest(n_a, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
    # scipy finds the interval by root search, hence the tolerance
    assert float(bounds.lower_confidence_bound(n_a, n, alpha)) == pytest.approx(
        two_sided.low, rel=1e-8, abs=1e-15
    )


def test_lower_bound_is_zero_not_nan_without_votes():
    assert float(bounds.lower_confidence_bound(0, 100_000, 0.001)) == 0.0
    p_a_lower, radius, abstained = bounds.cohen_radius(np.array([0]), 100_000, 0.001, 0.5)
    assert p_a_lower[0] == 0.0 and radius[0] == 0.0 and abstained[0]


def test_lower_bound_covers_p_with_probability_at_least_one_minus_alpha():
    # Exact coverage: sum the binomial mass of every k whose bound overshoots p.
    n, alpha = 60, 0.05
    bound = bounds.lower_confidence_bound(np.arange(n + 1), n, alpha)
    for p in np.linspace(0.01, 0.99, 99):
        overshoot = binom.pmf(np.arange(n + 1), n, p)[bound > p].sum()
        assert overshoot <= alpha + 1e-12


@pytest.mark.parametrize("n,first_certified", [(100_000, 50_490), (1_000, 550)])
def test_smallest_non_abstaining_count(n, first_certified):
    _, _, abstained = bounds.cohen_radius(
        np.array([first_certified - 1, first_certified]), n, 0.001, 1.0
    )
    assert list(abstained) == [True, False]


def test_radius_cap_closed_form():
    assert bounds.radius_cap(100_000, 0.001, 1.0) == pytest.approx(3.8115, abs=5e-5)
    assert bounds.radius_cap(100_000, 0.001, 0.5) == pytest.approx(
        0.5 * norm.ppf(0.001**1e-5), rel=1e-12
    )


def test_top2_spends_alpha_over_both_classes_by_union_bound():
    counts = np.array([[700, 200, 60, 40]])
    alpha, k = 0.01, 4
    p_a_lower, p_b_upper, radius, abstained = bounds.top2_radius(counts, np.array([0]), alpha, 0.5)
    assert p_a_lower[0] == pytest.approx(bounds.lower_confidence_bound(700, 1000, alpha / 2))
    others = [bounds.upper_confidence_bound(c, 1000, alpha / (2 * (k - 1))) for c in (200, 60, 40)]
    assert p_b_upper[0] == pytest.approx(max(others))
    assert radius[0] == pytest.approx(0.25 * (norm.ppf(p_a_lower[0]) - norm.ppf(p_b_upper[0])))
    assert not abstained[0]


def test_top2_family_wise_error_is_at_most_alpha():
    # 20,000 multinomial draws with known probabilities; the event "some bound fails" has
    # probability <= alpha = 0.1 by the union bound. The empirical rate exceeds 0.1 only if the true
    # rate is near it: P(Bin(20000, 0.09) > 2000) < 1e-6, and Clopper-Pearson is conservative.
    rng = np.random.default_rng(7)
    p = np.array([0.55, 0.35, 0.06, 0.04])
    alpha, n = 0.1, 200
    counts = rng.multinomial(n, p, size=20_000)
    c_hat = np.zeros(len(counts), dtype=int)
    p_a_lower, _, _, _ = bounds.top2_radius(counts, c_hat, alpha, 1.0)
    uppers = bounds.upper_confidence_bound(counts[:, 1:], n, alpha / (2 * 3))
    failed = (p_a_lower > p[0]) | (uppers < p[1:]).any(axis=1)
    assert failed.mean() <= alpha


def test_top2_abstains_on_a_tie():
    _, _, radius, abstained = bounds.top2_radius(np.array([[500, 500]]), np.array([0]), 0.001, 1.0)
    assert abstained[0] and radius[0] == 0.0


def test_predict_p_value_of_a_ten_nil_vote():
    assert bounds.predict_p_value(10, 0) == pytest.approx(2.0**-9, rel=1e-12)


@pytest.mark.parametrize("alpha,expected", [(0.001, 11), (0.5, 2), (0.25, 3), (0.01, 8)])
def test_min_predict_n(alpha, expected):
    n = bounds.min_predict_n(alpha)
    assert n == expected
    assert bounds.predict_p_value(n, 0) <= alpha < bounds.predict_p_value(n - 1, 0)
    assert math.isclose(bounds.predict_p_value(n, 0), 2.0 ** (1 - n))
