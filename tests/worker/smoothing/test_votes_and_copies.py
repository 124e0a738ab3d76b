"""Votes per class in every certify and predict row, and the noisy copies kept to look at."""

from __future__ import annotations

import numpy as np
import torch

from smoothcert.worker.smoothing import RunOptions, certify, noisy_copies, predict
from tests.support.classifiers import linear


def _boundary_model():
    """A linear classifier whose boundary passes through x = 0.5·1, so both classes get votes."""
    w = torch.from_numpy(np.random.default_rng(3).normal(size=(1, 8, 8)))
    return linear(w, -float(w.flatten().double().sum() * 0.5))


X = np.full((2, 1, 8, 8), 0.5, dtype=np.float32)


def test_certify_votes_count_the_estimation_samples_and_give_n_a():
    run = certify(_boundary_model(), X, sigma=0.5, n0=20, n=400, options=RunOptions(seed=11))
    for row in run.to_dict()["results"]:
        votes = row["votes"]
        # p = ½ for both classes: each gets votes unless a Binomial(400, ½) is 0 or 400 (p < 1e-119).
        assert set(votes) == {"0", "1"} and sum(votes.values()) == 400
        assert row["n_a"] in votes.values()
        if row["prediction"] is not None:
            assert votes[str(row["prediction"])] == row["n_a"]


def test_predict_votes_hold_n_a_and_n_b_as_their_two_largest():
    run = predict(_boundary_model(), X, sigma=0.5, n=400, alpha=0.001, options=RunOptions(seed=12))
    for row in run.to_dict()["results"]:
        counts = sorted(row["votes"].values(), reverse=True)
        assert sum(counts) == 400 and counts[:2] == [row["n_a"], row["n_b"]]


def test_noisy_copies_are_x_plus_gaussian_noise_of_sigma_and_reproducible():
    x = np.random.default_rng(0).uniform(size=(2, 1, 8, 8)).astype(np.float32)
    copies = noisy_copies(x, (1, 8, 8), 0.25, 400, seed=5)
    assert copies.shape == (2, 400, 1, 8, 8) and copies.dtype == np.float32
    noise = copies - x[:, None]
    # 51,200 draws of N(0, 0.25²) per input: the sample mean is off by more than 0.005 (4.5 standard
    # errors) and the sample std by more than 2% (6.4 standard errors) each with probability < 1e-5.
    for i in range(2):
        assert abs(noise[i].mean()) < 0.005 and abs(noise[i].std() / 0.25 - 1) < 0.02
    assert (copies < 0).any() and (copies > 1).any()  # never clamped: the classifier sees them so
    assert np.array_equal(copies, noisy_copies(x, (1, 8, 8), 0.25, 400, seed=5))
    assert not np.array_equal(copies, noisy_copies(x, (1, 8, 8), 0.25, 400, seed=6))
