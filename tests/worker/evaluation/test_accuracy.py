"""The one definition of certified accuracy, and the three views of it agreeing on the same inputs."""

from __future__ import annotations

import numpy as np

from smoothcert.worker.evaluation import accuracy, analyze, experiment
from smoothcert.worker.queue import certify_run

RADII = [0.0, 0.3, 0.5, 1.0]
# input 1 abstains, input 3 is certified but wrong: only inputs 0 and 2 count
ROWS = [
    {"prediction": 1, "label": 1, "radius": 0.3},
    {"prediction": None, "label": 1, "radius": 0.0},
    {"prediction": 2, "label": 2, "radius": 0.9},
    {"prediction": 0, "label": 1, "radius": 0.5},
]
EXPECTED = [0.5, 0.5, 0.25, 0.0]


def test_correct_and_certified_at_or_beyond_each_radius():
    shares = accuracy.certified_accuracy([True, False, True, False], [0.3, 0.0, 0.9, 0.5], RADII)
    assert shares.dtype == np.float64 and shares.tolist() == EXPECTED


def test_no_inputs_is_zero_at_every_radius():
    assert accuracy.certified_accuracy([], [], RADII).tolist() == [0.0] * len(RADII)


def test_log_experiment_and_job_views_agree():
    correct = np.array([r["prediction"] == r["label"] for r in ROWS])
    log = analyze.CertLog(
        path="-",
        idx=np.arange(4),
        label=np.array([1, 1, 2, 1]),
        predict=np.array([1, -1, 2, 0]),
        radius=np.array([r["radius"] for r in ROWS]),
        correct=correct,
        time=np.zeros(4),
    )
    assert analyze.certified_accuracy_of_log(log, RADII).tolist() == EXPECTED
    assert experiment.certified_accuracy_of_results(ROWS, [1, 1, 2, 1], RADII) == EXPECTED
    assert certify_run.certified_accuracy_of_rows(ROWS, RADII) == [
        {"radius": r, "accuracy": a} for r, a in zip(RADII, EXPECTED)
    ]
