"""The parameters of CERTIFY and PREDICT that every side shares: defaults, bounds and allowed values.

The API's schemas, the CLI and the engine take their defaults from here, so a default changes in
one place. Standard library only: the API and the CLI import this without torch.
"""

from __future__ import annotations

import math
import secrets
from typing import Final, Literal, get_args

Bound = Literal["cohen", "top2"]
"""How CERTIFY bounds the selected class: Cohen et al.'s one-class bound, or the two-class one."""
Mode = Literal["certify", "predict"]
Runtime = Literal["auto", "torch", "onnxruntime"]
"""What evaluates the base classifier: the fastest on the device, measured at load (auto), or one
pinned; an ONNX model runs in onnxruntime only (smoothcert.models.runtimes)."""
Precision = Literal["float32", "float16", "bfloat16"]
"""The base classifier's arithmetic; the noise is drawn and added in float32 whatever it is."""
Noise = Literal["gaussian", "discrete"]
"""The noise of the smoothed classifier: Gaussian in float32 (Cohen et al.), or the discretised
Gaussian on the 8-bit grid, added in integers (Voráček & Hein 2023: sound in floating point)."""

BOUNDS: Final[tuple[Bound, ...]] = get_args(Bound)
MODES: Final[tuple[Mode, ...]] = get_args(Mode)
RUNTIMES: Final[tuple[Runtime, ...]] = get_args(Runtime)
PRECISIONS: Final[tuple[Precision, ...]] = get_args(Precision)
NOISES: Final[tuple[Noise, ...]] = get_args(Noise)
DEFAULT_BOUND: Final[Bound] = "cohen"
DEFAULT_MODE: Final[Mode] = "certify"
DEFAULT_RUNTIME: Final[Runtime] = "auto"
DEFAULT_PRECISION: Final[Precision] = "float32"
DEFAULT_NOISE: Final[Noise] = "gaussian"

DEFAULT_N0: Final = 100  # samples that select the class
DEFAULT_N: Final = 100_000  # samples that bound its probability (the cap of a target-radius run)
DEFAULT_ALPHA: Final = 0.001  # failure probability of each answer
DEFAULT_PREDICT_N: Final = 1_000  # samples of PREDICT when called in-process (CLI, engine)

MAX_SEED: Final = 2**63 - 1  # the largest seed accepted (a torch generator takes 64 bits)
DRAWN_SEED_BOUND: Final = 2**53  # seeds drawn by the API stay exact in JavaScript clients


def draw_seed(below: int = MAX_SEED) -> int:
    """A fresh random seed in [0, below), for a call that was given none; the caller records it."""
    return secrets.randbelow(below)


# Where a certificate means something. The engine (worker/smoothing/checks.py), the API's schemas
# and the CLI refuse anything outside these bounds with the messages of the checks below.
MAX_SIGMA: Final = 1000.0
"""The largest noise level σ, in [0, 1] pixel units.

Noise is added in float32. At σ = 1000 a noisy pixel (|σz| < 6000 but with probability 2·10^-9) is still
resolved to 2^-11 ≈ 0.0005, finer than one step of an 8-bit image (1/255), so the noisy copies
still depend on the image; from σ ≈ 10^5 float32 rounding erases such steps, and from σ ≈ 10^7
x + σz rounds to σz: a certificate would no longer be about its input. Every radius is below 40σ
(Φ⁻¹ of a float64 probability lies within ±38.5), so it stays finite far beyond this bound; at
σ = 1e308 it overflows to infinity. Published smoothed classifiers use σ ≤ 1."""
MAX_DISCRETE_SIGMA: Final = 4.0
"""The largest σ of discrete noise: its table of thresholds grows with σ (2·255·(⌊6σ⌋ + 1)
entries, about 13,000 at σ = 4, each computed in 60-digit arithmetic); published smoothed
classifiers use σ ≤ 1."""
MIN_ALPHA: Final = 1e-20
"""The smallest failure probability α.

The Clopper–Pearson bound is Beta.ppf(α, n_A, n − n_A + 1) in float64 (scipy's inverse of the
incomplete beta function). Checked on a grid of n ≤ 10^8 and n_A ≤ n: from α ≈ 10^-80 it stops being
monotone in n_A, and below α ≈ 10^-100 it returns NaN (which compares as "not below ½", a
certificate of radius NaN); at 10^-20 it is accurate to a few ulps, with 60 orders of magnitude to
spare. No one needs a failure probability below 10^-20: it costs n ≥ 67 samples per input before
any certificate is possible."""
MAX_ALPHA: Final = 0.5
"""The largest failure probability α: a certificate that fails with probability above ½ is more
likely wrong than right. Bounding α away from 1 also keeps every radius finite: at α ≤ ½ a
unanimous vote gives p_A_lower = α^(1/n), which stays below 1 in float64 for every n below 10^15;
near α = 1 it rounds to 1 (at α = 1 − 10^-12 from n ≈ 20,000 on) and σ·Φ⁻¹(1) is infinite."""


def check_sigma_bound(sigma: float) -> None:
    """ValueError unless ``sigma`` (a positive number) is at most :data:`MAX_SIGMA`."""
    if sigma > MAX_SIGMA:
        raise ValueError(
            f"sigma must be at most {MAX_SIGMA:g} (noise in [0, 1] pixel units; beyond it the "
            f"noisy copies no longer depend on the input), got {sigma!r}"
        )


def check_alpha_bound(alpha: float) -> None:
    """ValueError unless ``alpha`` (a number in (0, 1)) lies in [:data:`MIN_ALPHA`, :data:`MAX_ALPHA`]."""
    if not MIN_ALPHA <= alpha <= MAX_ALPHA:
        raise ValueError(
            f"alpha must lie in [{MIN_ALPHA:g}, {MAX_ALPHA:g}] (below it the confidence bound is "
            f"not computed reliably, above it a certificate is more likely wrong than right), "
            f"got {alpha!r}"
        )


def min_certify_n(alpha: float, bound: Bound = "cohen") -> int:
    """The least n at which a unanimous vote of n samples certifies a positive radius.

    A unanimous vote gives p_A_lower = a^(1/n), with a = alpha for the ``cohen`` bound and alpha/2
    for ``top2`` (which spends the other half on the runner-up); the radius cap σ·Φ⁻¹(a^(1/n)) is
    positive when a^(1/n) > ½, that is n > log2(1/a). Below this n every input abstains.
    """
    level = alpha if bound == "cohen" else alpha / 2
    n = max(1, math.floor(math.log2(1 / level)) + 1)
    while n > 1 and level ** (1.0 / (n - 1)) > 0.5:  # rounding of log2 may have overshot by one
        n -= 1
    while not level ** (1.0 / n) > 0.5:
        n += 1
    return n


def check_certify_n(n: int, alpha: float, bound: Bound = "cohen") -> None:
    """ValueError unless CERTIFY's ``n`` lets a unanimous vote certify (:func:`min_certify_n`)."""
    least = min_certify_n(alpha, bound)
    if n < least:
        raise ValueError(
            f"n={n} is too small for alpha={alpha!r}: even if all {n} samples agree, the {bound} "
            f"bound certifies no radius (its cap would be <= 0); CERTIFY needs n >= {least}"
        )


def check_noise(noise: str, sigma: float, quantize: bool) -> None:
    """ValueError when discrete noise is asked for beyond :data:`MAX_DISCRETE_SIGMA`, or
    ``quantize`` without discrete noise (Gaussian noise takes any float input as it is)."""
    if noise == "discrete" and sigma > MAX_DISCRETE_SIGMA:
        raise ValueError(
            f"discrete noise takes sigma at most {MAX_DISCRETE_SIGMA:g} (its thresholds table "
            f"grows with sigma), got {sigma!r}"
        )
    if quantize and noise != "discrete":
        raise ValueError("quantize rounds inputs onto the 8-bit grid for noise discrete only")
