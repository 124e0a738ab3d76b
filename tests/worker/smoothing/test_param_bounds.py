"""σ, α and n bounded to where the radius and the radius cap are finite and positive.

The bounds are in service/core/params.py; the engine refuses what lies beyond them, and at them a
certificate is still a finite, positive number with the closed form σ·Φ⁻¹(α^(1/n)).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from smoothcert.service.core.params import MAX_ALPHA, MAX_SIGMA, MIN_ALPHA, min_certify_n
from smoothcert.worker.smoothing import (
    InputError,
    RunOptions,
    bounds,
    certify,
    certify_at_radius,
    check_params,
    predict,
)
from tests.support.classifiers import constant

X = np.full((1, 8, 8), 0.5, dtype=np.float32)
SERVER_MAX_N = 2_000_000  # the test stack's SMOOTHCERT_MAX_N; the default is 1,000,000


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"sigma": 1e308}, r"^sigma must be at most 1000 .*, got 1e\+308"),
        ({"sigma": math.nextafter(MAX_SIGMA, math.inf)}, "^sigma must be at most 1000"),
        ({"alpha": 5e-324}, r"^alpha must lie in \[1e-20, 0\.5\] .*, got 5e-324"),
        ({"alpha": 0.7}, r"^alpha must lie in \[1e-20, 0\.5\]"),
        ({"n": 9}, r"^n=9 is too small for alpha=0\.001: .*CERTIFY needs n >= 10"),
        ({"n": 10, "bound": "top2"}, "^n=10 is too small .*the top2 bound.*n >= 11"),
    ],
)
def test_the_engine_refuses_parameters_beyond_the_bounds(bad, message):
    with pytest.raises(InputError, match=message):
        check_params(**{"sigma": 0.25, "alpha": 0.001, "n0": 10, "n": 100, "bound": "cohen", **bad})
    with pytest.raises(InputError, match=message):
        certify(constant(), X, **{"sigma": 0.25, "n0": 10, "n": 100, **bad})


def test_predict_and_the_test_at_a_radius_share_the_sigma_and_alpha_bounds():
    for call in (
        lambda **kw: predict(constant(), X, **{"sigma": 0.25, "n": 100, **kw}),
        lambda **kw: certify_at_radius(
            constant(), X, **{"sigma": 0.25, "target_radius": 0.1, "n0": 10, "n_max": 100, **kw}
        ),
    ):
        with pytest.raises(InputError, match="^sigma must be at most"):
            call(sigma=1e308)
        with pytest.raises(InputError, match="^alpha must lie in"):
            call(alpha=5e-324)


def test_n_below_the_least_is_left_to_predict_and_the_test_at_a_radius():
    # PREDICT refuses its own too-small n; the test at a radius draws nothing when out of reach.
    check_params(sigma=0.25, alpha=0.001, n=5)
    check_params(sigma=0.25, alpha=0.001, n0=10, n_max=5, target_radius=0.1)


@pytest.mark.parametrize("alpha", [MIN_ALPHA, 1e-6, 0.001, 0.05, MAX_ALPHA])
@pytest.mark.parametrize("bound", ["cohen", "top2"])
def test_the_least_n_is_where_a_unanimous_vote_first_certifies(alpha, bound):
    least = min_certify_n(alpha, bound)
    level = alpha if bound == "cohen" else alpha / 2
    assert least == math.floor(math.log2(1 / level)) + 1
    assert bounds.radius_cap(least, alpha, 1.0, bound, 10) > 0
    assert bounds.radius_cap(least - 1, alpha, 1.0, bound, 10) <= 0 or least == 1


@pytest.mark.parametrize("alpha", [MIN_ALPHA, MAX_ALPHA])
@pytest.mark.parametrize("n", ["least", 100_000, SERVER_MAX_N])
def test_at_the_bounds_the_radius_cap_is_finite_positive_and_closed_form(alpha, n):
    n = min_certify_n(alpha) if n == "least" else n
    cap = bounds.radius_cap(n, alpha, MAX_SIGMA)
    assert math.isfinite(cap) and cap > 0
    assert cap == pytest.approx(MAX_SIGMA * norm.ppf(math.exp(math.log(alpha) / n)), rel=1e-12)
    top2 = bounds.radius_cap(
        n if n > min_certify_n(alpha, "top2") else min_certify_n(alpha, "top2"),
        alpha,
        MAX_SIGMA,
        "top2",
        1000,
    )
    assert math.isfinite(top2) and top2 > 0


@pytest.mark.parametrize("alpha", [MIN_ALPHA, MAX_ALPHA])
@pytest.mark.parametrize("n", [67, 1000, 100_000, SERVER_MAX_N])
def test_at_the_bounds_every_count_gives_a_finite_bound_and_radius(alpha, n):
    n_a = np.unique(
        np.r_[0:60, n - np.r_[0:60], np.linspace(0, n, 500).astype(np.int64)].clip(0, n)
    )
    p_a_lower, radius, abstained = bounds.cohen_radius(n_a, n, alpha, MAX_SIGMA)
    assert np.isfinite(p_a_lower).all() and np.isfinite(radius).all()
    assert ((p_a_lower >= 0) & (p_a_lower < 1)).all() and (np.diff(p_a_lower) >= 0).all()
    assert (radius[~abstained] >= 0).all() and (radius[abstained] == 0).all()


def test_beyond_the_bounds_the_numbers_break():
    # Why the bounds: what the engine would have answered without them.
    with np.errstate(over="ignore"):
        assert math.isinf(bounds.radius_cap(100_000, 0.001, 1e308))
    assert bounds.radius_cap(100, 5e-324, 0.25) < 0
    p_a_lower, radius, abstained = bounds.cohen_radius(np.array([9]), 10, 5e-324, 0.25)
    assert (
        np.isnan(p_a_lower[0]) and np.isnan(radius[0]) and not abstained[0]
    )  # "certified", radius NaN
    assert math.isinf(bounds.radius_cap(100_000, 1 - 1e-12, 0.25))


def test_certify_at_the_bounds_gives_a_finite_certificate():
    n = min_certify_n(MIN_ALPHA)
    run = certify(
        constant(), X, sigma=MAX_SIGMA, n0=10, n=n, alpha=MIN_ALPHA, options=RunOptions(seed=0)
    )
    (cert,) = run.results
    assert (
        cert.prediction == 3 and math.isfinite(cert.radius) and cert.radius == cert.radius_cap > 0
    )
