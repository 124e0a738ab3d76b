"""The discretised Gaussian on the 8-bit grid, as integers: the law behind ``noise="discrete"``.

Randomized smoothing's theorem is about real numbers; x + σ·δ rounded to float32 is not the
point it speaks of (Voráček & Hein, ICLR 2023). For an image on the grid x = k/255 the engine
certifies F(z) = f(clip(round₂₅₅(z))) instead of f. Cohen's theorem holds for F as for any
classifier, and F(x + σ·δ) has exactly the law of f((k + j)/255) with k + j clipped to
[−255K, 255(K+1)], where j is the integer offset with P(j) = the N(0, σ²) mass of
[(j − ½)/255, (j + ½)/255]: the model only ever sees a function of an integer vector.

j is drawn by inverse transform from a uniform integer U in [0, 2^60): j = −M + #{i : T_i ≤ U}
with the thresholds T_i = round(2^60·Φ((i + ½)/(255σ))), i = −M … M − 1, M = 255(K + 1),
K = max(1, ⌊6σ⌋) (offsets beyond ±M only move a pixel further past the clip, so the tails are
lumped at ±M without changing the clipped law). The thresholds come from 60-digit arithmetic
(mpmath), so the only distance from the exact law is their rounding to 2^-60:
:func:`total_variation` bounds it per coordinate, and :func:`alpha_effective` adds it, times
the number of coordinates drawn (d·n), to α. No torch here: ``smoothcert verify`` recomputes the
thresholds' digest and ``alpha_effective`` with this module.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Final

import mpmath
import numpy as np
import numpy.typing as npt

from smoothcert.service.core.grid import LEVELS, grid_levels
from smoothcert.service.core.params import MAX_DISCRETE_SIGMA

__all__ = ["LEVELS", "Thresholds", "alpha_effective", "clip_k", "grid_levels", "thresholds"]

UNIFORM_BITS: Final = 60
"""Bits of the uniform integers drawn per pixel."""
DIGITS: Final = 60
"""Decimal digits of the arithmetic the thresholds are computed in."""
# Where |t| exceeds this, 2^60·Φ(−|t|) < 0.14 rounds to 0 (and 2^60·Φ(|t|) to 2^60): those
# thresholds are exact without computing Φ.
_TAIL_T: Final = 9.0


@dataclass(frozen=True)
class Thresholds:
    """The integer thresholds of one σ: ``values[i + offset]`` is T_i for i = −offset … offset − 1.

    ``k`` is K; offsets j lie in [−offset, offset] and k + j is clipped to ``[low, high]``.
    ``sha256`` digests ``values`` as little-endian int64; ``total_variation`` bounds the distance
    of one drawn offset from the exact discretised Gaussian."""

    sigma: float
    k: int
    values: npt.NDArray[np.int64]
    sha256: str
    total_variation: float

    @property
    def offset(self) -> int:
        return LEVELS * (self.k + 1)

    @property
    def low(self) -> int:
        return -LEVELS * self.k

    @property
    def high(self) -> int:
        return LEVELS * (self.k + 1)

    def describe(self, coordinates: int, alpha: float) -> dict[str, Any]:
        """The provenance fields of a run that drew ``coordinates`` pixels per input's estimate."""
        return {
            "noise": "discrete",
            "noise_k": self.k,
            "thresholds_sha256": self.sha256,
            "total_variation": self.total_variation,
            "alpha_effective": alpha_effective(alpha, self.total_variation, coordinates),
        }


def clip_k(sigma: float) -> int:
    """K = max(1, ⌊6σ⌋): noisy pixels are clipped to [−K, K + 1] (in [0, 1] units)."""
    return max(1, math.floor(6 * sigma))


@functools.lru_cache(maxsize=16)
def thresholds(sigma: float) -> Thresholds:
    """The thresholds of noise level ``sigma`` (cached per σ), with their digest and the
    sampler's total-variation distance from the exact law per coordinate."""
    if not 0 < sigma <= MAX_DISCRETE_SIGMA:
        raise ValueError(f"discrete noise takes 0 < sigma <= {MAX_DISCRETE_SIGMA:g}, got {sigma!r}")
    k = clip_k(sigma)
    m = LEVELS * (k + 1)
    scale = 2**UNIFORM_BITS
    with mpmath.workdps(DIGITS):
        s = mpmath.mpf(LEVELS) * mpmath.mpf(sigma)  # σ is a float64: exact in mpmath
        values = np.empty(2 * m, dtype=np.int64)
        errors = np.zeros(2 * m)  # T_i − 2^60·Φ_i, where Φ_i was computed (0 elsewhere)
        for pos, i in enumerate(range(-m, m)):
            t = (mpmath.mpf(i) + mpmath.mpf(0.5)) / s
            if t < -_TAIL_T:
                values[pos] = 0
                continue
            if t > _TAIL_T:
                values[pos] = scale
                continue
            exact = scale * mpmath.ncdf(t)
            rounded = int(mpmath.nint(exact))
            values[pos] = rounded
            errors[pos] = float(rounded - exact)
        tail = float(scale * mpmath.ncdf(-_TAIL_T))
    # The drawn pmf is ΔT/2^60 and the exact one ΔΦ, so their difference at offset j is
    # (e_j − e_{j−1})/2^60 with e_{−M−1} = e_M = 0. Where T is 0 (or 2^60) without Φ computed,
    # e is monotone, so its steps there sum to at most the tail mass ``tail`` per side.
    steps = np.abs(np.diff(np.concatenate(([0.0], errors, [0.0])))).sum() + 4 * tail
    tv = 0.5 * float(steps) / scale
    digest = hashlib.sha256(values.astype("<i8").tobytes()).hexdigest()
    return Thresholds(float(sigma), k, values, digest, math.nextafter(tv, math.inf))


def alpha_effective(alpha: float, total_variation: float, coordinates: int) -> float:
    """α plus the sampler's distance from the exact law over the ``coordinates`` pixels one
    input's estimate draws (d·n): with probability at least 1 − alpha_effective the certificate
    holds for draws of the exact discretised Gaussian coupled with ours."""
    return float(alpha + total_variation * coordinates)
