"""Randomized smoothing, batched: CERTIFY and PREDICT of Cohen, Rosenfeld & Kolter (2019).

The smoothed classifier is g(x) = argmax_c P(f(x + δ) = c), δ ~ N(0, σ²I), with the noise added
in [0,1] pixel space (the base classifier normalises after it) and never clamped.

Sampling (`count_votes`) is separate from the statistics (`bounds`). Noise is drawn on the
model's device from a generator seeded per call; the samples of several inputs share a batch, so
every batch but the last is full; votes are counted on the device with one bincount per batch.
Same seed, same batch size and same device give bit-identical counts.

This module does not import Celery: the CLI, the worker tasks and the benchmarks all call it.
"""
from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from smoothcert.models.base import BaseClassifier
from smoothcert.worker import bounds
from smoothcert.worker.provenance import software_versions

Progress = Callable[[int, int], None]
CancelCheck = Callable[[], bool]

MAX_SEED = 2**63 - 1


class InputError(ValueError):
    """The inputs or parameters of a call cannot be certified; the message says why, in one line."""


class Canceled(RuntimeError):
    """The cancel check asked the run to stop; raised between batches."""


@dataclass
class Certificate:
    """CERTIFY's answer for one input.

    With probability ≥ 1 − alpha over the sampling, the smoothed classifier predicts
    ``prediction`` everywhere within ℓ₂ distance ``radius`` of the input. ``prediction`` is None
    (and ``radius`` 0) when the run abstains. ``elapsed_s`` is the input's share of the run's
    wall time (inputs share batches).
    """

    index: int
    prediction: int | None
    radius: float
    p_a_lower: float
    n_a: int
    n: int
    radius_cap: float
    elapsed_s: float
    p_b_upper: float | None = None   # the top2 bound only

    @property
    def abstained(self) -> bool:
        return self.prediction is None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["abstained"] = self.abstained
        if self.p_b_upper is None:
            del d["p_b_upper"]
        return d


@dataclass
class Prediction:
    """PREDICT's answer for one input: the class (None on abstain) and the binomial test behind it.

    If the smoothed classifier's top class is c, the probability that ``prediction`` is a class
    other than c is at most alpha.
    """

    index: int
    prediction: int | None
    p_value: float
    n_a: int
    n_b: int
    n: int
    elapsed_s: float

    @property
    def abstained(self) -> bool:
        return self.prediction is None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "abstained": self.abstained}


@dataclass
class Run:
    """Results of one call, in input order, and the provenance that makes them reproducible."""

    results: list[Any]
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"results": [r.to_dict() for r in self.results], "provenance": self.provenance}


def certify(
    model: BaseClassifier,
    x,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int | None = None,
    seed: int | None = None,
    bound: str = "cohen",
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
) -> Run:
    """CERTIFY every input of ``x`` ((C, H, W) or (N, C, H, W), floats in [0,1]).

    Per input: the class with most votes among n0 noisy copies is selected, then n fresh copies
    bound its probability (``bound`` "cohen": Clopper–Pearson at alpha; "top2": the two-class
    bound of ``bounds.top2_radius``). Each returned :class:`Certificate` holds with probability
    ≥ 1 − alpha. ``progress(done, total)`` (in samples) and ``should_cancel()`` run between batches.
    """
    _check_params(sigma=sigma, alpha=alpha, n=n, n0=n0, bound=bound)
    sampler = _Sampler(model, x, sigma, batch_size, seed, progress, should_cancel)
    selection, counts = sampler.counts((n0, n))
    c_hat = selection.argmax(axis=1)
    n_a = counts[np.arange(len(c_hat)), c_hat]
    p_b_upper = None
    if bound == "cohen":
        p_a_lower, radius, abstained = bounds.cohen_radius(n_a, n, alpha, sigma)
    else:
        p_a_lower, p_b_upper, radius, abstained = bounds.top2_radius(counts, c_hat, alpha, sigma)
    cap = bounds.radius_cap(n, alpha, sigma, bound, model.info.num_classes)
    per_input = sampler.elapsed() / len(c_hat)
    results = [
        Certificate(
            index=i,
            prediction=None if abstained[i] else int(c_hat[i]),
            radius=float(radius[i]),
            p_a_lower=float(p_a_lower[i]),
            n_a=int(n_a[i]),
            n=n,
            radius_cap=cap,
            elapsed_s=per_input,
            p_b_upper=None if p_b_upper is None else float(p_b_upper[i]),
        )
        for i in range(len(c_hat))
    ]
    params = {"mode": "certify", "sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "bound": bound}
    return Run(results, sampler.provenance(params))


def predict(
    model: BaseClassifier,
    x,
    sigma: float,
    n: int = 1_000,
    alpha: float = 0.001,
    batch_size: int | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
) -> Run:
    """PREDICT every input of ``x``: the top class of n noisy copies, or an abstention.

    Abstains when the two-sided binomial test of the top two counts n_a ≥ n_b at p = ½ gives a
    p-value above alpha; a returned class differs from g(x) with probability ≤ alpha. Refuses an
    n so small that even a unanimous vote could not pass that test.
    """
    _check_params(sigma=sigma, alpha=alpha, n=n)
    least = bounds.min_predict_n(alpha)
    if n < least:
        raise InputError(f"n={n} can never pass the test at alpha={alpha}: PREDICT needs n >= {least}")
    sampler = _Sampler(model, x, sigma, batch_size, seed, progress, should_cancel)
    (counts,) = sampler.counts((n,))
    per_input = sampler.elapsed() / len(counts)
    results = []
    for i, row in enumerate(counts):
        top2 = np.argsort(row, kind="stable")[::-1][:2]
        n_a, n_b = int(row[top2[0]]), int(row[top2[1]]) if len(row) > 1 else 0
        p_value = bounds.predict_p_value(n_a, n_b)
        results.append(
            Prediction(
                index=i,
                prediction=None if p_value > alpha else int(top2[0]),
                p_value=p_value,
                n_a=n_a,
                n_b=n_b,
                n=n,
                elapsed_s=per_input,
            )
        )
    return Run(results, sampler.provenance({"mode": "predict", "sigma": sigma, "n": n, "alpha": alpha}))


def default_batch_size(input_shape, device: torch.device) -> int:
    """A batch that keeps the noise buffer near 16 MB on a CPU (160 MB on a GPU), at most 10,000."""
    per_sample = int(np.prod(input_shape))
    budget = 40_000_000 if device.type == "cuda" else 4_000_000
    return max(1, min(10_000, budget // per_sample))


def draw_seed() -> int:
    """A fresh random seed for a call that did not give one (it is recorded in the provenance)."""
    return secrets.randbelow(MAX_SEED)


def as_input_batch(x, input_shape) -> np.ndarray:
    """Validate ``x`` against a model's (C, H, W) and return it as float32 (N, C, H, W).

    Refuses, with a one-line :class:`InputError`: non-float data, a shape other than (C, H, W) or
    (N, C, H, W) with N ≥ 1, NaN or infinite values, and values outside [0, 1].
    """
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"inputs must be floats in [0, 1], got dtype {arr.dtype} (scale 8-bit images by 1/255)")
    expected = tuple(int(d) for d in input_shape)
    if arr.shape == expected:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:] != expected or arr.shape[0] == 0:
        raise InputError(f"inputs have shape {arr.shape}, the model takes {expected} or (N, *{expected})")
    if not np.isfinite(arr).all():
        raise InputError("inputs contain NaN or infinite values")
    low, high = float(arr.min()), float(arr.max())
    if low < 0.0 or high > 1.0:
        raise InputError(f"inputs must lie in [0, 1] pixel space, found values in [{low:g}, {high:g}]")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _check_params(*, sigma: float, alpha: float, n: int, n0: int = 1, bound: str = "cohen") -> None:
    if not (isinstance(sigma, (int, float)) and np.isfinite(sigma) and sigma > 0):
        raise InputError(f"sigma must be a positive number, got {sigma!r}")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise InputError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    for name, value in (("n0", n0), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if bound not in bounds.BOUNDS:
        raise InputError(f"bound must be one of {', '.join(bounds.BOUNDS)}, got {bound!r}")


class _Sampler:
    """Draws the noisy copies of a set of inputs, feeds them to the model, counts the votes."""

    def __init__(self, model, x, sigma, batch_size, seed, progress, should_cancel):
        self.model = model
        device = torch.device(model.device)
        self.x = torch.from_numpy(as_input_batch(x, model.info.input_shape)).to(device)
        if batch_size is None:
            batch_size = default_batch_size(model.info.input_shape, device)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if seed is None:
            seed = draw_seed()
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
            raise InputError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        self.sigma, self.batch_size, self.seed = float(sigma), int(batch_size), int(seed)
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        self.num_classes = int(model.info.num_classes)
        self.progress, self.should_cancel = progress, should_cancel
        self.started = time.perf_counter()

    def counts(self, stages: tuple[int, ...]) -> list[np.ndarray]:
        """Votes (N, K) of fresh noisy copies of each input, one array per stage size.

        Every stage gets its own draws, but all stages of all inputs form one stream of samples,
        so every batch except the last is full: sample j belongs to input j // m and to the stage
        whose range holds j % m, with m = sum(stages).
        """
        x, k = self.x, self.num_classes
        num_inputs, per_input, num_stages = x.shape[0], sum(stages), len(stages)
        total = per_input * num_inputs
        ends = torch.tensor(np.cumsum(stages)[:-1], device=x.device)
        votes = torch.zeros(num_inputs * num_stages * k, dtype=torch.int64, device=x.device)
        noise = torch.empty((min(self.batch_size, total), *x.shape[1:]), dtype=x.dtype, device=x.device)
        largest = torch.zeros((), dtype=torch.int64, device=x.device)
        for start in range(0, total, self.batch_size):
            if self.should_cancel is not None and self.should_cancel():
                raise Canceled("canceled")
            stop = min(start + self.batch_size, total)
            sample = torch.arange(start, stop, device=x.device)
            owner = sample // per_input
            stage = torch.bucketize(sample % per_input, ends, right=True)
            batch = noise[: stop - start]
            torch.randn(batch.shape, generator=self.generator, out=batch)
            batch.mul_(self.sigma).add_(x.index_select(0, owner))
            labels = self.model.classify(batch)
            # Checked once per call, not per batch, so a GPU never waits on the host here.
            largest = torch.maximum(largest, labels.max())
            slot = (owner * num_stages + stage) * k + labels
            votes += torch.bincount(slot, minlength=votes.numel())
            if self.progress is not None:
                self.progress(stop, total)
        if int(largest) >= k:
            raise InputError(f"the model answered class {int(largest)}, but declares {k} classes")
        per_stage = votes.view(num_inputs, num_stages, k).cpu().numpy()
        return [per_stage[:, s] for s in range(num_stages)]

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def provenance(self, params: dict[str, Any]) -> dict[str, Any]:
        info = self.model.info
        return {
            **params,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_inputs": int(self.x.shape[0]),
            "device": str(self.x.device),
            "runtime": self.model.runtime,
            "provider": self.model.provider,
            "precision": self.model.precision,
            "model_sha256": info.sha256,
            "model_format": info.format,
            "model_arch": info.arch,
            "versions": software_versions(),
            "elapsed_s": self.elapsed(),
        }
