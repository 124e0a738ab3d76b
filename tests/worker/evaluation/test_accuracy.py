"""The one definition of certified accuracy, and the three views of it agreeing on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

from smoothcert.service.core import certificates
from smoothcert.service.core.contract import CertifyJob, CertifyParams, ChunkTask, DatasetRange
from smoothcert.worker.evaluation import accuracy, analyze, experiment
from smoothcert.worker.queue import certify_run, dataset_jobs

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


# ACR by hand on ROWS: input 0 is right at 0.3, input 2 right at 0.9; the abstention (1) and the
# wrong certificate (3, radius 0.5) count 0: (0.3 + 0 + 0.9 + 0) / 4 = 0.3.
EXPECTED_ACR = 0.3


def test_acr_by_hand():
    acr = accuracy.average_certified_radius([True, False, True, False], [0.3, 0.0, 0.9, 0.5])
    assert isinstance(acr, float) and acr == pytest.approx(EXPECTED_ACR, abs=1e-15)
    assert accuracy.average_certified_radius([], []) == 0.0
    assert accuracy.average_certified_radius([False, False], [1.0, 2.0]) == 0.0
    with pytest.raises(ValueError):
        accuracy.average_certified_radius([True], [1.0, 2.0])


def test_acr_is_the_area_under_the_certified_accuracy_curve():
    rng = np.random.default_rng(0)
    right, radius = rng.random(50) < 0.7, rng.random(50) * 2
    corners = accuracy.certified_accuracy_steps(right, radius)
    # the curve is flat between corners at the value of the later one: sum of width × height
    area = sum((x1 - x0) * y1 for (x0, _), (x1, y1) in zip(corners, corners[1:]))
    assert accuracy.average_certified_radius(right, radius) == pytest.approx(area, abs=1e-12)


def test_job_metrics_have_acr_beside_certified_accuracy():
    metrics = certify_run.label_metrics(ROWS, "certify", RADII)
    assert metrics["acr"] == pytest.approx(EXPECTED_ACR, abs=1e-15)
    assert [p["accuracy"] for p in metrics["certified_accuracy"]] == EXPECTED
    assert "acr" not in certify_run.label_metrics(ROWS, "predict", None)


def test_certificate_summary_uses_the_same_acr():
    rows = [{**row, "index": i} for i, row in enumerate(ROWS)]
    summary = certificates.summary(rows, "certify")
    assert summary is not None and summary["acr"] == pytest.approx(EXPECTED_ACR, abs=1e-15)


def test_a_dataset_jobs_combined_result_has_acr():
    params = CertifyParams("m", sigma=0.25, n0=10, n=100, seed=3)
    job = CertifyJob(params, 4, DatasetRange("d", 0, None, 2, 2))
    outcomes = {}
    for index in (0, 1):
        task = ChunkTask.planned(job, index, "sha", None)
        rows = [
            {**ROWS[i], "index": i, "abstained": ROWS[i]["prediction"] is None}
            for i in range(task.start, task.stop)
        ]
        provenance = {"chunk": index, "start": task.start, "stop": task.stop, "worker": "w"}
        provenance |= {"pid": 1, "seed": task.chunk_seed, "num_inputs": len(rows)}
        provenance |= {"device": "cpu", "elapsed_s": 1.0, "batch_size": 8, "sigma": 0.25}
        outcomes[index] = {"rows": rows, "provenance": provenance}
    result = dataset_jobs.combine_chunks(ChunkTask.planned(job, 0, "sha", RADII), outcomes, 2.0)
    assert result["acr"] == pytest.approx(EXPECTED_ACR, abs=1e-15)
    assert [p["accuracy"] for p in result["certified_accuracy"]] == EXPECTED
