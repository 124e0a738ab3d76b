"""The parameter checks shared by CERTIFY, PREDICT and the test at a target radius.

The bounds beyond plain ranges (σ ≤ MAX_SIGMA, MIN_ALPHA ≤ α ≤ MAX_ALPHA, CERTIFY's least n) are
defined, with their reasons, in :mod:`smoothcert.service.core.params`; the API and the CLI apply
the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from smoothcert.service.core.params import (
    BOUNDS,
    MAX_SEED,
    check_alpha_bound,
    check_certify_n,
    check_sigma_bound,
)


class InputError(ValueError):
    """The inputs or parameters of a call cannot be certified; the message says why, in one line."""


class BatchSizeError(InputError):
    """A ``batch_size`` asked for does not fit the memory budget, and lowering it was not asked for.

    ``requested``: the batch size asked for; ``fits``: the most noisy copies of the model that fit
    ``budget`` bytes.
    """

    def __init__(self, requested: int, fits: int, budget: int):
        self.requested, self.fits, self.budget = requested, fits, budget
        super().__init__(
            f"batch_size={requested} does not fit the memory budget ({budget:,} bytes hold at most "
            f"{fits} noisy copies of this model): give a batch_size of at most {fits}, leave it "
            "out to have one chosen that fits, or ask for it to be lowered to fit "
            "(lower_batch_size=True), which changes the noise stream"
        )

    def __reduce__(self):
        return type(self), (self.requested, self.fits, self.budget)


def check_params(
    *,
    sigma: float,
    alpha: float,
    n0: int | None = None,
    n: int | None = None,
    n_max: int | None = None,
    bound: str | None = None,
    target_radius: float | None = None,
    beta: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
) -> None:
    """Raise :class:`InputError` for the first parameter that is out of its range.

    A parameter left at None is not checked: the call has no such parameter (PREDICT has no n0
    or bound, only the test at a target radius has n_max, target_radius and beta), or picks it
    itself (batch_size from the input size, a seed at random, beta = alpha). Only CERTIFY passes
    ``bound``, and with it its n must let a unanimous vote certify a positive radius.
    """
    if not (_is_real(sigma) and np.isfinite(sigma) and sigma > 0):
        raise InputError(f"sigma must be a positive number, got {sigma!r}")
    _bounded(check_sigma_bound, sigma)
    if not (_is_real(alpha) and 0 < alpha < 1):
        raise InputError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    _bounded(check_alpha_bound, alpha)
    for name, count in (("n0", n0), ("n", n), ("n_max", n_max)):
        if count is not None and not (_is_int(count) and count >= 1):
            raise InputError(f"{name} must be a positive integer, got {count!r}")
    if bound is not None and bound not in BOUNDS:
        raise InputError(f"bound must be one of {', '.join(BOUNDS)}, got {bound!r}")
    if bound is not None and n is not None:
        _bounded(check_certify_n, n, alpha, bound)
    if target_radius is not None and not (
        _is_real(target_radius) and math.isfinite(target_radius) and target_radius >= 0
    ):
        raise InputError(f"target_radius must be a finite number >= 0, got {target_radius!r}")
    if beta is not None and not (_is_real(beta) and 0 < beta < 1):
        raise InputError(f"beta must lie strictly between 0 and 1, got {beta!r}")
    if batch_size is not None and not (_is_int(batch_size) and batch_size >= 1):
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if seed is not None and not (_is_int(seed) and 0 <= seed <= MAX_SEED):
        raise InputError(f"seed must be an integer in [0, 2^63), got {seed!r}")


def _bounded(check: Callable[..., None], *args: Any) -> None:
    """Run a check of :mod:`~smoothcert.service.core.params`, its ValueError raised as InputError."""
    try:
        check(*args)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float))


def _is_int(value: object) -> bool:
    # bool is an int to Python, never a count or a seed here; numpy integers are.
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
