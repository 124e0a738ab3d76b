"""The one parameter check of certify, predict and certify_at_radius: its messages, and that all three use it."""

import numpy as np
import pytest

from smoothcert.worker.smoothing import (
    InputError,
    RunOptions,
    certify,
    certify_at_radius,
    check_params,
    predict,
)
from tests.support.classifiers import constant

X = np.full((1, 8, 8), 0.5, dtype=np.float32)
GOOD = {"sigma": 0.25, "alpha": 0.001, "n0": 10, "n": 100}


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"sigma": -1.0}, r"sigma must be a positive number, got -1\.0"),
        ({"sigma": float("nan")}, "sigma must be a positive number"),
        ({"sigma": "0.25"}, "sigma must be a positive number"),
        ({"alpha": 0.0}, r"alpha must lie strictly between 0 and 1, got 0\.0"),
        ({"alpha": None}, "alpha must lie strictly between 0 and 1"),
        ({"n0": 0}, "n0 must be a positive integer, got 0"),
        ({"n": 2.5}, r"n must be a positive integer, got 2\.5"),
        ({"n": True}, "n must be a positive integer, got True"),
        ({"n_max": -3}, "n_max must be a positive integer, got -3"),
        ({"bound": "hoeffding"}, "bound must be one of cohen, top2, got 'hoeffding'"),
        ({"target_radius": float("inf")}, "target_radius must be a finite number >= 0, got inf"),
        ({"target_radius": -0.5}, "target_radius must be a finite number >= 0"),
        ({"beta": 1.0}, r"beta must lie strictly between 0 and 1, got 1\.0"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"seed": 2**63}, r"seed must be an integer in \[0, 2\^63\)"),
        ({"seed": False}, "seed must be an integer"),
    ],
)
def test_each_parameter_is_refused_with_its_own_message(bad, message):
    with pytest.raises(InputError, match=f"^{message}"):
        check_params(**{**GOOD, **bad})


def test_none_is_not_checked_and_numpy_integers_are_counts():
    check_params(sigma=0.25, alpha=0.001)
    check_params(
        sigma=np.float64(0.5),
        alpha=0.05,
        n0=np.int64(5),
        n=np.int32(7),
        n_max=np.uint16(9),
        bound="top2",
        target_radius=0,
        beta=0.5,
        batch_size=np.int64(1),
        seed=2**63 - 1,
    )


def test_the_first_bad_parameter_is_the_one_reported():
    with pytest.raises(InputError, match="^sigma"):
        check_params(sigma=0.0, alpha=2.0, n=0)


@pytest.mark.parametrize(
    "call",
    [
        lambda **kw: certify(constant(), X, **{"sigma": 0.25, "n0": 10, "n": 100, **kw}),
        lambda **kw: predict(constant(), X, **{"sigma": 0.25, "n": 100, **kw}),
        lambda **kw: certify_at_radius(
            constant(), X, **{"sigma": 0.25, "target_radius": 0.1, "n0": 10, "n_max": 100, **kw}
        ),
    ],
    ids=["certify", "predict", "certify_at_radius"],
)
@pytest.mark.parametrize(
    "bad,message",
    [
        ({"sigma": 0.0}, "sigma"),
        ({"alpha": 1.5}, "alpha"),
        ({"options": RunOptions(batch_size=-1)}, "batch_size"),
        ({"options": RunOptions(seed=-1)}, "seed"),
    ],
)
def test_all_three_functions_refuse_the_same_way(call, bad, message):
    with pytest.raises(InputError, match=f"^{message} must"):
        call(**bad)


def test_n_max_is_named_in_the_message_of_the_test_at_a_radius():
    with pytest.raises(InputError, match="^n_max must be a positive integer"):
        certify_at_radius(constant(), X, 0.25, 0.1, n0=10, n_max=0)


def test_certify_takes_no_target_radius_any_more():
    with pytest.raises(TypeError):
        certify(constant(), X, 0.25, n0=10, n=100, target_radius=0.1)  # type: ignore[call-arg]
