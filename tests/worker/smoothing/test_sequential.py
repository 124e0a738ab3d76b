"""The anytime-valid test at a target radius: error rate at the worst case, closed forms, agreement."""

import numpy as np
import pytest
import torch

from smoothcert.worker.smoothing import InputError, RunOptions, bounds, certify, certify_at_radius
from smoothcert.worker.smoothing.sequential import (
    MIN_CHUNK,
    SequentialTest,
    Verdict,
    lower_confidence_sequence,
    p0_for,
)
from tests.support.classifiers import constant, linear

X = np.full((1, 8, 8), 0.5, dtype=np.float32)


def simulate(p_a: float, decide, n_max: int, runs: int, seed: int):
    """Vote streams of a coin with P(vote) = p_a, looked at on the engine's schedule (the first look
    after MIN_CHUNK draws, each later one at most doubling n); returns the verdict of every run."""
    rng = np.random.default_rng(seed)
    n = np.zeros(runs, dtype=np.int64)
    k = np.zeros(runs, dtype=np.int64)
    verdict = np.zeros(runs, dtype=np.int64)
    while (active := np.flatnonzero(verdict == 0)).size:
        step = np.minimum(np.maximum(n[active], MIN_CHUNK), n_max - n[active])
        k[active] += rng.binomial(step, p_a)
        n[active] += step
        verdict[active] = decide(n[active], k[active])
    return verdict, n


def naive_clopper_pearson(p0, alpha, n_max):
    """Certify as soon as the fixed-n Clopper-Pearson bound exceeds p0: re-checked, so unsound."""

    def decide(n, k):
        certified = bounds.lower_confidence_bound(k, n, alpha) > p0
        return np.where(certified, 1, np.where(n >= n_max, -1, 0))

    return decide


def test_false_certifications_at_the_worst_case_stay_below_alpha_and_naive_rechecks_do_not():
    # p_A = p0 exactly: every certificate is false. Ville's inequality bounds the rate by alpha =
    # 0.05 for any stopping rule. Measured over 4,000 seeded runs it is about 0.008; the assertion
    # could fail under another seed only if the true rate were near alpha (if it were 0.03:
    # P(Bin(4000, 0.03) > 200) < 1e-9). The naive rule, re-checking a Clopper-Pearson bound at each
    # look, certifies about 26% of the runs: five times alpha.
    alpha, n_max, runs = 0.05, 20_000, 4_000
    p0 = p0_for(0.25, 0.5)
    test = SequentialTest(p0, alpha, alpha, n_max)
    verdict, _ = simulate(p0, test.decide, n_max, runs, seed=1)
    sound = (verdict == 1).mean()
    naive_verdict, _ = simulate(p0, naive_clopper_pearson(p0, alpha, n_max), n_max, runs, seed=1)
    naive = (naive_verdict == 1).mean()
    assert sound <= alpha
    assert naive > 2 * alpha, f"naive re-checking gave {naive:.3f}"


def test_futility_stop_costs_no_alpha_and_stops_hopeless_inputs_early():
    # p_A = 0.6 against p0 = Φ(0.5) = 0.69: the test gives up long before the cap.
    # No certificate may come out (that would be a false one; probability <= alpha per run).
    test = SequentialTest(p0_for(0.5, 1.0), 0.001, 0.001, 100_000)
    verdict, n = simulate(0.6, test.decide, 100_000, 200, seed=2)
    assert (verdict == -1).all() and np.median(n) < 2_000


def test_unanimous_votes_certify_one_sigma_within_a_few_hundred_samples():
    run = certify_at_radius(
        constant(label=4),
        X,
        sigma=0.5,
        target_radius=0.5,
        n0=100,
        n_max=100_000,
        options=RunOptions(seed=0),
    )
    (decision,) = run.results
    assert decision.certified_at_r and decision.prediction == 4
    assert decision.samples_used <= 400 and decision.radius >= 0.5


def test_radius_beyond_reach_answers_without_sampling():
    # Φ⁻¹(α^(1/n_max)) = 3.81 at n_max = 100,000 and α = 0.001; r/σ = 4 is beyond it.
    run = certify_at_radius(
        constant(),
        X,
        sigma=0.25,
        target_radius=1.0,
        n0=100,
        n_max=100_000,
        options=RunOptions(seed=0),
    )
    (decision,) = run.results
    assert not decision.certified_at_r and decision.samples_used == 0
    assert "beyond reach" in decision.reason


def _linear_inputs(distances):
    w = torch.from_numpy(np.random.default_rng(3).normal(size=(1, 8, 8)))
    xs = np.stack([0.5 + d * (w / w.norm()).numpy() for d in distances]).astype(np.float32)
    return linear(w, -float(w.flatten().double().sum() * 0.5)), xs


def test_agrees_with_fixed_n_on_easy_inputs_and_uses_far_fewer_samples():
    # Inputs at distance 0.3 to 0.6 of a linear boundary, σ = 0.25, r = 0.1: p_A >= 0.88 against
    # p0 = 0.66, so both protocols certify unless a 1-in-1000 event happens (alpha per input).
    model, xs = _linear_inputs([0.3, 0.4, -0.5, 0.6])
    fixed = certify(model, xs, sigma=0.25, n0=100, n=100_000, options=RunOptions(seed=3))
    seq = certify_at_radius(
        model, xs, sigma=0.25, target_radius=0.1, n0=100, n_max=100_000, options=RunOptions(seed=3)
    )
    assert (
        [r.radius >= 0.1 for r in fixed.results]
        == [d.certified_at_r for d in seq.results]
        == [True] * 4
    )
    assert [r.prediction for r in fixed.results] == [d.prediction for d in seq.results]
    assert sum(d.samples_used for d in seq.results) * 40 < 4 * 100_100
    assert seq.provenance["samples_used"] == sum(d.samples_used for d in seq.results)


def test_hard_inputs_take_the_samples_and_every_answer_is_honest():
    # On the boundary (p_A = ½) nothing may be certified at r = 0.1 (probability <= alpha).
    model, xs = _linear_inputs([0.0, 0.5, 0.0])
    seq = certify_at_radius(
        model, xs, sigma=0.25, target_radius=0.1, n0=100, n_max=20_000, options=RunOptions(seed=4)
    )
    hard, easy = seq.results[0], seq.results[1]
    assert not hard.certified_at_r and easy.certified_at_r
    assert hard.samples_used > easy.samples_used


def test_confidence_sequence_lower_bound_is_below_the_fixed_n_bound_and_grows_with_n():
    # The price of validity at any stopping time: a little wider than Clopper-Pearson.
    for k, n in [(90, 100), (900, 1000), (9000, 10_000)]:
        assert lower_confidence_sequence(k, n, 0.001) < float(
            bounds.lower_confidence_bound(k, n, 0.001)
        )
    assert (
        lower_confidence_sequence(900, 1000, 0.001)
        < lower_confidence_sequence(9000, 10_000, 0.001)
        < 0.9
    )
    assert lower_confidence_sequence(0, 100, 0.001) == 0.0


def test_bad_target_radius_is_refused():
    with pytest.raises(InputError, match="target_radius"):
        certify_at_radius(constant(), X, sigma=0.25, target_radius=-1.0, n0=10, n_max=100)
    with pytest.raises(InputError, match="beta"):
        certify_at_radius(constant(), X, sigma=0.25, target_radius=0.1, beta=2.0, n0=10, n_max=100)


def test_verdicts_are_the_three_named_values():
    test = SequentialTest(p0_for(0.25, 0.5), 0.001, 0.001, 1_000)
    verdict = test.decide([1_000, 64, 1_000, 64], [1_000, 44, 500, 0])
    assert list(verdict) == [Verdict.CERTIFIED, Verdict.UNDECIDED, Verdict.STOPPED, Verdict.STOPPED]
    assert (Verdict.CERTIFIED, Verdict.UNDECIDED, Verdict.STOPPED) == (1, 0, -1)


def test_progress_counts_inputs_settled_not_samples():
    # The easy input (distance 0.5) settles within a few rounds, the one on the boundary takes the
    # cap: progress goes 0 -> 1 -> 2 of 2 inputs, never down, and never counts samples.
    model, xs = _linear_inputs([0.0, 0.5])
    calls: list[tuple[int, int]] = []
    options = RunOptions(seed=4, progress=lambda done, total: calls.append((done, total)))
    seq = certify_at_radius(
        model, xs, sigma=0.25, target_radius=0.1, n0=100, n_max=2_000, options=options
    )
    assert {total for _, total in calls} == {2}
    dones = [done for done, _ in calls]
    assert dones == sorted(dones) and dones[0] == 0 and dones[-1] == 2 and 1 in dones
    assert seq.results[0].samples_used > seq.results[1].samples_used


def test_progress_of_a_radius_beyond_reach_is_every_input_settled_at_once():
    calls: list[tuple[int, int]] = []
    certify_at_radius(
        constant(),
        np.stack([X, X, X]),
        sigma=0.25,
        target_radius=1.0,
        n0=100,
        n_max=100_000,
        options=RunOptions(seed=0, progress=lambda done, total: calls.append((done, total))),
    )
    assert calls == [(3, 3)]
