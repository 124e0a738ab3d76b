"""Tests for smoothcert.service.core.accuracy: the one definition of certified accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from smoothcert.service.core.accuracy import (
    DEFAULT_CURVE_RADII,
    certified_accuracy,
    certified_accuracy_steps,
)

# input 1 abstains, input 3 is certified but wrong: only inputs 0 and 2 count
CORRECT = [True, False, True, False]
RADIUS = [0.3, 0.0, 0.9, 0.5]


def test_correct_and_certified_at_or_beyond_each_radius():
    shares = certified_accuracy(CORRECT, RADIUS, [0.0, 0.3, 0.5, 0.9, 1.0])
    assert shares.dtype == np.float64 and shares.tolist() == [0.5, 0.5, 0.25, 0.25, 0.0]


def test_the_curves_default_radii_are_0_to_4_in_quarters():
    assert DEFAULT_CURVE_RADII == tuple(0.25 * i for i in range(17))
    assert DEFAULT_CURVE_RADII[0] == 0.0 and DEFAULT_CURVE_RADII[-1] == 4.0


def test_no_inputs_is_zero_at_every_radius():
    assert certified_accuracy([], [], [0.0, 1.0]).tolist() == [0.0, 0.0]
    assert certified_accuracy_steps([], []) == [(0.0, 0.0)]


def test_steps_fall_at_the_radii_of_correct_inputs_only():
    assert certified_accuracy_steps(CORRECT, RADIUS) == [
        (0.0, 0.5),
        (0.3, 0.5),
        (0.3, 0.25),
        (0.9, 0.25),
        (0.9, 0.0),
    ]
    # two correct inputs at the same radius make one step of two
    assert certified_accuracy_steps([True, True, True], [0.5, 0.5, 1.0]) == [
        (0.0, 1.0),
        (0.5, 1.0),
        (0.5, pytest.approx(1 / 3)),
        (1.0, pytest.approx(1 / 3)),
        (1.0, 0.0),
    ]


def test_steps_agree_with_the_definition_between_and_at_their_corners():
    rng = np.random.default_rng(0)
    correct = rng.random(200) < 0.7
    radius = np.round(rng.random(200) * 2, 2)  # ties on purpose
    points = certified_accuracy_steps(correct, radius)
    assert all(isinstance(r, float) and isinstance(a, float) for r, a in points)
    assert points[0] == (0.0, certified_accuracy(correct, radius, [0.0])[0])
    assert [r for r, _ in points[1::2]] == sorted(set(radius[correct].tolist()))
    for (r, a), (_, b) in zip(points[1::2], points[2::2]):
        assert a == certified_accuracy(correct, radius, [r])[0]
        assert b == certified_accuracy(correct, radius, [np.nextafter(r, np.inf)])[0]
