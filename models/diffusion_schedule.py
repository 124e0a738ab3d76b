"""The noise schedule of a diffusion model, and which of its timesteps matches a noise level σ.

Torch-free (numpy only), so the API can refuse a σ that a pipeline's diffusion denoiser cannot
take before a job is queued; :mod:`smoothcert.models.diffusion` denoises with it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from smoothcert.models.metadata import ModelError

DEFAULT_BETA_START, DEFAULT_BETA_END = 1e-4, 0.02  # Ho et al.'s linear schedule
# (2σ)² above the last step's ratio by more than rounding is out of the schedule's range.
_RANGE_RTOL = 1e-9


def linear_schedule(
    timesteps: int, beta_start: float = DEFAULT_BETA_START, beta_end: float = DEFAULT_BETA_END
) -> dict[str, Any]:
    """The metadata of a linear-β schedule: β_t evenly spaced from ``beta_start`` to ``beta_end``
    over ``timesteps`` steps, ``alphas_cumprod`` ᾱ_t = Π_{s≤t} (1 − β_s), and how it was made."""
    if timesteps < 1 or not 0 < beta_start <= beta_end < 1:
        raise ModelError(
            f"a linear schedule needs timesteps >= 1 and 0 < beta_start <= beta_end < 1, not "
            f"{timesteps}, {beta_start}, {beta_end}"
        )
    betas = np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
    return {
        "kind": "linear",
        "timesteps": int(timesteps),
        "beta_start": float(beta_start),
        "beta_end": float(beta_end),
        "alphas_cumprod": np.cumprod(1.0 - betas).tolist(),
    }


def check_alphas_cumprod(values: Any) -> np.ndarray:
    """``values`` as a float64 array ᾱ_t: at least one number, each in (0, 1], never increasing;
    ModelError otherwise."""
    try:
        alphas = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ModelError("the schedule's alphas_cumprod must be a list of numbers") from None
    if alphas.ndim != 1 or alphas.size == 0 or not np.isfinite(alphas).all():
        raise ModelError("the schedule's alphas_cumprod must be a non-empty list of finite numbers")
    if (alphas <= 0).any() or (alphas > 1).any() or (np.diff(alphas) > 0).any():
        raise ModelError(
            "the schedule's alphas_cumprod must lie in (0, 1] and never increase with t"
        )
    return alphas


def noise_ratios(alphas_cumprod: Any) -> np.ndarray:
    """(1 − ᾱ_t)/ᾱ_t per step: the variance of the noise relative to the signal at timestep t."""
    alphas = check_alphas_cumprod(alphas_cumprod)
    return (1.0 - alphas) / alphas


def sigma_at(alphas_cumprod: Any, t: int) -> float:
    """The [0,1]-pixel noise level σ that timestep ``t`` matches: √((1 − ᾱ_t)/ᾱ_t) / 2."""
    return float(math.sqrt(noise_ratios(alphas_cumprod)[t]) / 2.0)


def largest_sigma(alphas_cumprod: Any) -> float:
    """The largest σ the schedule covers: that of its last (noisiest) step."""
    alphas = check_alphas_cumprod(alphas_cumprod)
    return sigma_at(alphas, len(alphas) - 1)


def timestep_for_sigma(alphas_cumprod: Any, sigma: float) -> int:
    """The 0-based timestep t whose (1 − ᾱ_t)/ᾱ_t is nearest (2σ)²: the step whose noise matches
    pixel noise σ once the image is scaled to [−1, 1]. A tie goes to the smaller t (less noise).

    ModelError for σ ≤ 0 or not finite, and for σ beyond the last step's noise level (more than
    rounding above it), naming the largest σ the schedule covers.
    """
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, (int, float, np.floating))
        or not math.isfinite(sigma)
        or sigma <= 0
    ):
        raise ModelError(f"a diffusion denoiser needs a noise level σ > 0, not {sigma!r}")
    ratios = noise_ratios(alphas_cumprod)
    target = (2.0 * float(sigma)) ** 2
    if target > ratios[-1] * (1.0 + _RANGE_RTOL):
        most = math.sqrt(ratios[-1]) / 2.0
        raise ModelError(
            f"σ = {sigma:g} is beyond this diffusion model's schedule: its noisiest step "
            f"(t = {len(ratios) - 1}) matches σ = {most:.4g} in [0,1] pixels; certify at σ <= "
            f"{most:.4g}, or use a model with a longer schedule"
        )
    return int(np.argmin(np.abs(ratios - target)))  # argmin: the first of equal distances


def schedule_of(extra: dict[str, Any], what: str) -> np.ndarray:
    """ᾱ_t of a diffusion denoiser's metadata ``extra["schedule"]["alphas_cumprod"]``; ModelError
    naming ``what`` (the file) when it is missing or malformed."""
    schedule = extra.get("schedule")
    if not isinstance(schedule, dict) or "alphas_cumprod" not in schedule:
        raise ModelError(
            f"{what}: a diffusion denoiser's metadata needs extra.schedule.alphas_cumprod "
            "(ᾱ_t per timestep)"
        )
    try:
        return check_alphas_cumprod(schedule["alphas_cumprod"])
    except ModelError as exc:
        raise ModelError(f"{what}: {exc}") from None
