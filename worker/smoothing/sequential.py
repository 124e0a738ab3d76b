"""Anytime-valid certification at a target radius: is g certified at radius r around x?

A certificate at radius r needs p_A > p0 = Φ(r/σ). Instead of a fixed n, votes for the selected
class ĉ are drawn batch after batch and a betting (mixture) test is checked after each one:

    E_n(p) = ∫_{q>p} q^k (1−q)^(n−k) π(q) dq / (p^k (1−p)^(n−k)),   π = Beta(a, b) restricted to (p, 1],

after n draws with k votes for ĉ (a = b = ½). For every p' ≤ p the process E_n(p) is a nonnegative
supermartingale with E_0 = 1, so by Ville's inequality P(E_n(p0) ≥ 1/α for some n) ≤ α when
p_A ≤ p0: certifying the first time E_n(p0) ≥ 1/α is wrong with probability ≤ α, whatever the
batching and whenever the run stops. The mirrored statistic (π restricted to [0, p)) stops a
hopeless input once it reaches 1/β; stopping for that reason, or at the cap, never certifies, so
it costs no α.

Re-checking an ordinary Clopper–Pearson bound after every batch is not valid: it multiplies the
chances of a false certificate (tests/worker/smoothing/test_sequential.py measures it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import IntEnum

import numpy as np
import numpy.typing as npt
import torch
from scipy.special import betaln
from scipy.stats import beta as beta_dist
from scipy.stats import norm

from smoothcert.models.base import BaseClassifier
from smoothcert.service.core.params import (
    DEFAULT_ALPHA,
    DEFAULT_N,
    DEFAULT_N0,
    DEFAULT_NOISE,
    Noise,
)
from smoothcert.worker.smoothing.checks import check_params
from smoothcert.worker.smoothing.options import Progress, RunOptions
from smoothcert.worker.smoothing.results import RadiusDecision, Run
from smoothcert.worker.smoothing.sampling import Inputs, Sampler, open_sampler

PRIOR = (0.5, 0.5)
MIN_CHUNK = (
    32  # draws per input between two looks, at least; after that each look at most doubles n
)


class Verdict(IntEnum):
    """What :meth:`SequentialTest.decide` says of one input after a look."""

    CERTIFIED = 1
    UNDECIDED = 0  # draw more
    STOPPED = -1  # no certificate: hopeless, or the cap reached


def log_e_value(
    p: npt.ArrayLike,
    k: npt.ArrayLike,
    n: npt.ArrayLike,
    *,
    prior: tuple[float, float] = PRIOR,
    upper: bool = True,
) -> np.ndarray:
    """ln E_n(p) for k votes in n draws; ``upper=False`` gives the mirrored statistic (q < p)."""
    a, b = prior
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    tail = beta_dist.logsf if upper else beta_dist.logcdf
    with np.errstate(divide="ignore", invalid="ignore"):
        log_e: np.ndarray = (
            betaln(k + a, n - k + b)
            - betaln(a, b)
            + tail(p, k + a, n - k + b)
            - tail(p, a, b)
            - k * np.log(p)
            - (n - k) * np.log1p(-np.asarray(p, dtype=np.float64))
        )
    return log_e


@dataclass(frozen=True)
class SequentialTest:
    """The stopping rule for one p0, alpha, beta and cap ``n_max``."""

    p0: float
    alpha: float
    beta: float
    n_max: int

    def decide(self, n: npt.ArrayLike, k: npt.ArrayLike) -> np.ndarray:
        """A :class:`Verdict` per input (+1 certified, −1 stop without a certificate, 0 go on).

        Evaluates the statistics at the current counts (a few per input and run, so cheaper than
        tabulating a threshold for every n up to n_max).
        """
        n, k = np.asarray(n), np.asarray(k)
        certified = log_e_value(self.p0, k, n) >= math.log(1 / self.alpha)
        hopeless = log_e_value(self.p0, k, n, upper=False) >= math.log(1 / self.beta)
        stopped = np.where(
            hopeless | (n >= self.n_max), Verdict.STOPPED.value, Verdict.UNDECIDED.value
        )
        return np.where(certified, Verdict.CERTIFIED.value, stopped)

    def reachable(self) -> bool:
        """False when even a unanimous vote of n_max draws cannot certify (then nothing is drawn)."""
        return bool(log_e_value(self.p0, self.n_max, self.n_max) >= math.log(1 / self.alpha))


def lower_confidence_sequence(k: int, n: int, alpha: float, *, grid: int = 2048) -> float:
    """The least p not yet excluded at level alpha: a lower bound on p_A valid at any stopping time.

    Scans p from 0 to k/n on a grid of ``grid`` points and refines the first crossing by
    bisection; 0 when nothing is excluded.
    """
    if k == 0 or n == 0:
        return 0.0
    target = math.log(1 / alpha)
    top = k / n if k < n else 1 - 1e-12
    ps = np.linspace(top / grid, top, grid)
    excluded = log_e_value(ps, k, n) >= target
    if excluded.all():
        return float(top)
    first = int(np.argmin(excluded))
    if first == 0:
        return 0.0
    low, high = ps[first - 1], ps[first]
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if log_e_value(mid, k, n) >= target else (low, mid)
    return float(low)


def p0_for(target_radius: float, sigma: float) -> float:
    """The least p_A that certifies radius r at noise σ: Φ(r/σ)."""
    return float(norm.cdf(target_radius / sigma))


def certify_at_radius(
    model: BaseClassifier,
    x: Inputs,
    sigma: float,
    target_radius: float,
    n0: int = DEFAULT_N0,
    n_max: int = DEFAULT_N,
    alpha: float = DEFAULT_ALPHA,
    *,
    beta: float | None = None,
    options: RunOptions | None = None,
    noise: Noise = DEFAULT_NOISE,
    quantize: bool = False,
) -> Run[RadiusDecision]:
    """Decide "is g certified at radius r?" for every input of ``x`` with as few draws as it takes.

    Selection as in CERTIFY (n0 draws, never reused); then every undecided input gets fresh
    draws, at least MIN_CHUNK and at most as many as it already has, until
    :class:`SequentialTest` decides or n_max is reached. Decided inputs leave; the others fill
    the batch. When r is out of reach even for a unanimous vote of n_max, nothing is drawn.
    Each ``certified_at_r`` is wrong with probability ≤ alpha; ``beta`` (alpha when None) is the
    level of the futility stop, which never certifies. ``options``, batches and scores as in
    :func:`~smoothcert.worker.smoothing.certify.certify`, and so are ``noise`` and ``quantize``.
    """
    options = options or RunOptions()
    check_params(
        sigma=sigma,
        n0=n0,
        n_max=n_max,
        alpha=alpha,
        target_radius=target_radius,
        beta=beta,
        batch_size=options.batch_size,
        seed=options.seed,
    )
    beta = alpha if beta is None else beta
    # Progress counts inputs settled, not samples (the sample budget is a cap, not a count); it
    # is still called after every batch, selection's included, as a run's watchdog expects.
    settled = options.progress
    sampler = open_sampler(
        model, x, sigma, replace(options, progress=None), noise=noise, quantize=quantize
    )
    if settled is not None:
        sampler.progress = lambda _done, _total: settled(0, sampler.num_inputs)
    test = SequentialTest(p0_for(target_radius, sigma), alpha, beta, n_max)
    num = sampler.num_inputs
    n, k = np.zeros(num, dtype=np.int64), np.zeros(num, dtype=np.int64)
    verdict = np.full(num, Verdict.STOPPED.value)
    c_hat = np.zeros(num, dtype=np.int64)
    reachable = test.reachable()
    used0 = 0
    if reachable:
        (selection,) = sampler.sample_counts(n0)
        c_hat, used0 = selection.argmax(axis=1), n0
        verdict[:] = Verdict.UNDECIDED.value
        _test_until_decided(sampler, test, c_hat, n, k, verdict, settled)
    if settled is not None:
        settled(num, num)
    per_input = sampler.elapsed() / num
    results = []
    for i in range(num):
        p_a_lower = lower_confidence_sequence(int(k[i]), int(n[i]), alpha)
        certain = p_a_lower > 0.5
        certified = bool(verdict[i] == Verdict.CERTIFIED)
        if not reachable:
            reason = (
                f"r/sigma = {target_radius / sigma:.4g} is beyond reach of n_max = {n_max} draws "
                f"at alpha = {alpha}"
            )
        elif certified:
            reason = "certified"
        else:
            reason = "cap reached" if n[i] >= n_max else "stopped early: p_A is below Phi(r/sigma)"
        results.append(
            RadiusDecision(
                index=i,
                prediction=int(c_hat[i]) if certain else None,
                certified_at_r=certified,
                target_radius=float(target_radius),
                radius=float(sigma * norm.ppf(p_a_lower)) if certain else 0.0,
                p_a_lower=p_a_lower,
                n_a=int(k[i]),
                n=int(n[i]),
                samples_used=used0 + int(n[i]),
                reason=reason,
                elapsed_s=per_input,
            )
        )
    params = {
        "mode": "certify",
        "target_radius": float(target_radius),
        "sigma": sigma,
        "n0": n0,
        "n_max": n_max,
        "alpha": alpha,
        "beta": beta,
        "bound": "sequential",
    }
    provenance = sampler.provenance(params)
    provenance["samples_used"] = int(sum(r.samples_used for r in results))
    return Run(results, provenance)


def _test_until_decided(
    sampler: Sampler,
    test: SequentialTest,
    c_hat: np.ndarray,
    n: np.ndarray,
    k: np.ndarray,
    verdict: np.ndarray,
    settled: Progress | None,
) -> None:
    """Draw for the undecided inputs until none is left; updates n, k, verdict in place and
    reports ``settled(inputs decided, inputs)`` after each round."""
    device = sampler.x.device
    c_hat_t = torch.from_numpy(c_hat).to(device)
    batch = sampler.batch_size
    while (active := np.flatnonzero(verdict == Verdict.UNDECIDED)).size:
        sampler.check_cancel()
        share = max(MIN_CHUNK, -(-batch // active.size))
        want = np.minimum(
            np.minimum(np.maximum(n[active], MIN_CHUNK), share), test.n_max - n[active]
        )
        fits = np.cumsum(want) <= batch
        fits[0] = True
        active, want = active[fits], want[fits]
        want[0] = min(want[0], batch)
        owner = torch.from_numpy(np.repeat(np.arange(active.size), want)).to(device)
        labels = sampler.classify_noisy(torch.from_numpy(active).to(device)[owner])
        hits = torch.bincount(
            owner,
            weights=(labels == c_hat_t[active][owner]).to(torch.float64),
            minlength=active.size,
        )
        n[active] += want
        k[active] += hits.round().to(torch.int64).cpu().numpy()
        verdict[active] = test.decide(n[active], k[active])
        if settled is not None:
            settled(int(np.count_nonzero(verdict != Verdict.UNDECIDED.value)), len(n))
    sampler.check_output()
