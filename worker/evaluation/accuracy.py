"""Certified accuracy: the one definition that logs, experiments and job results all report. numpy only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def certified_accuracy(
    correct: Sequence[bool] | np.ndarray,
    radius: Sequence[float] | np.ndarray,
    radii: Sequence[float],
) -> np.ndarray:
    """For each r in ``radii``, the fraction of inputs that are correct and certified at radius ≥ r.

    ``correct[i]`` says whether input i's certified class is its label (False for an abstention)
    and ``radius[i]`` is its certified radius. Returns a float64 array, one entry per radius;
    with no inputs, accuracy is 0.0 at every radius.
    """
    correct = np.asarray(correct, dtype=bool)
    radius = np.asarray(radius, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64).reshape(-1, 1)
    if len(correct) == 0:
        return np.zeros(r.shape[0])
    return (correct & (radius >= r)).mean(axis=1)
