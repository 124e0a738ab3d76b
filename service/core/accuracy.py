"""Certified accuracy and the average certified radius (ACR): the one definition that job
results, certification logs, experiments, certificates and the API's curve all report, and the
radii a curve is reported at when none are asked for.

Certified accuracy at radius r is the share of inputs whose certified class is their label (an
abstention never is) with a certified radius ≥ r; ACR is the mean of the certified radius where the
class is the label, 0 elsewhere. numpy only: the API imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The curve's radii when none are given: a job's ``certified_accuracy`` and `smoothcert analyze`.
DEFAULT_CURVE_RADII: tuple[float, ...] = tuple(0.25 * i for i in range(17))  # 0, 0.25, ..., 4.0


def certified_accuracy(
    correct: Sequence[bool] | np.ndarray,
    radius: Sequence[float] | np.ndarray,
    radii: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """For each r in ``radii``, the fraction of inputs that are correct and certified at radius ≥ r.

    ``correct[i]`` says whether input i's certified class is its label (False for an abstention)
    and ``radius[i]`` is its certified radius. Returns a float64 array, one entry per radius;
    with no inputs, accuracy is 0.0 at every radius.
    """
    right = np.asarray(correct, dtype=bool)
    radius = np.asarray(radius, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64).reshape(-1, 1)
    if len(right) == 0:
        return np.zeros(r.shape[0])
    return (right & (radius >= r)).mean(axis=1)


def certified_accuracy_steps(
    correct: Sequence[bool] | np.ndarray, radius: Sequence[float] | np.ndarray
) -> list[tuple[float, float]]:
    """The whole curve of :func:`certified_accuracy`, exactly, as (radius, accuracy) corners.

    The curve is a step function that falls only at the radii of correct inputs: it starts with
    (0.0, accuracy at 0), then each such radius s, in increasing order, gives two corners, (s,
    accuracy at s) and (s, accuracy just past s), the latter being the accuracy at the next such
    radius (0.0 past the largest). With no inputs it is [(0.0, 0.0)].
    """
    right = np.asarray(correct, dtype=bool)
    steps = np.unique(np.asarray(radius, dtype=np.float64)[right]).tolist()
    at = certified_accuracy(right, radius, [0.0, *steps]).tolist()
    past = [*at[2:], 0.0]
    points = [(0.0, at[0])]
    for step, a, b in zip(steps, at[1:], past):
        points += [(step, a), (step, b)]
    return points


def average_certified_radius(
    correct: Sequence[bool] | np.ndarray, radius: Sequence[float] | np.ndarray
) -> float:
    """ACR: the mean over the (labelled) inputs of the certified radius where the certified class
    is the label, counting 0 for a wrong class or an abstention.

    It is also the area under the :func:`certified_accuracy` curve. ``correct`` and ``radius`` as
    there; with no inputs it is 0.0.
    """
    right = np.asarray(correct, dtype=bool)
    radius = np.asarray(radius, dtype=np.float64)
    if right.shape != radius.shape:
        raise ValueError(f"{right.size} correct flags for {radius.size} radii")
    if len(right) == 0:
        return 0.0
    return float(np.where(right, radius, 0.0).mean())
