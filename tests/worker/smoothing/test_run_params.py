"""run_params: a job's typed parameters run the engine call they name, with the same answers as
calling it directly (same seed, same batch size)."""

from __future__ import annotations

import numpy as np
import torch

from smoothcert.service.core.contract import CertifyParams
from smoothcert.worker.smoothing import (
    RunOptions,
    certify,
    certify_at_radius,
    predict,
    run_params,
)
from tests.support.classifiers import linear

# Class 1 at distance 0.3 from the boundary: p_A = Φ(0.3 / σ), about 0.885 at σ = 0.25.
MODEL = linear(torch.ones(1, 2, 2) / 2, 0.0)
X = np.full((2, 1, 2, 2), 0.15)
OPTIONS = RunOptions(seed=5, batch_size=50)


def rows(run) -> list[dict]:
    """The rows less their timing, which is all two runs of one seed may differ in."""
    return [{k: v for k, v in r.to_dict().items() if k != "elapsed_s"} for r in run.results]


def test_each_mode_runs_its_own_call_with_the_same_answers():
    params = CertifyParams("m", 0.25, n0=20, n=400, alpha=0.01)
    direct = certify(MODEL, X, 0.25, 20, 400, 0.01, options=OPTIONS)
    assert rows(run_params(MODEL, X, params, OPTIONS)) == rows(direct)
    two = CertifyParams("m", 0.25, n0=20, n=400, alpha=0.01, bound="top2")
    direct = certify(MODEL, X, 0.25, 20, 400, 0.01, bound="top2", options=OPTIONS)
    assert rows(run_params(MODEL, X, two, OPTIONS)) == rows(direct)
    guess = CertifyParams("m", 0.25, n=400, alpha=0.01, mode="predict")
    assert rows(run_params(MODEL, X, guess, OPTIONS)) == rows(
        predict(MODEL, X, 0.25, 400, 0.01, options=OPTIONS)
    )
    at = CertifyParams("m", 0.25, n0=20, n=400, alpha=0.01, target_radius=0.1)
    decided = run_params(MODEL, X, at, OPTIONS)
    assert rows(decided) == rows(
        certify_at_radius(MODEL, X, 0.25, 0.1, 20, 400, 0.01, options=OPTIONS)
    )
    assert all("certified_at_r" in r for r in rows(decided))
