"""The 8-bit grid that discrete noise needs its inputs on: x = k / 255, k in 0..255.

8-bit images (PNG/JPEG, uint8 arrays) are on it by construction; float inputs are accepted when
every value times 255 lies within :data:`GRID_TOLERANCE` of an integer, or rounded onto it when
the caller asks (``quantize``: the certificate is then about the rounded image). The API checks
uploads with :func:`grid_levels` before it queues a job, and the engine checks again before it
draws. numpy only: the API imports it without torch.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

LEVELS: Final = 255
"""Steps of the 8-bit grid."""
GRID_TOLERANCE: Final = 1e-4
"""How far from an integer value·255 may be for a float input to count as on the grid."""


def grid_levels(x: npt.NDArray[Any], quantize: bool = False) -> npt.NDArray[np.int16]:
    """The grid levels k = round(255·x) of inputs in [0, 1] (uint8 pixels are their own levels).

    A float input must lie on the grid unless ``quantize``, which rounds it; ValueError
    (:func:`off_grid_message`) otherwise."""
    if x.dtype == np.uint8:
        return x.astype(np.int16)
    scaled = np.asarray(x, dtype=np.float64) * LEVELS
    levels = np.rint(scaled)
    if not quantize:
        off = np.abs(scaled - levels)
        if off.size and float(off.max()) > GRID_TOLERANCE:
            raise ValueError(off_grid_message(float(off.max())))
    return np.clip(levels, 0, LEVELS).astype(np.int16)


def off_grid_message(distance: float) -> str:
    """Why float inputs off the grid cannot take discrete noise, and the two ways out."""
    return (
        "discrete noise needs inputs on the 8-bit grid: every value times 255 within "
        f"{GRID_TOLERANCE:g} of an integer (one is {distance:.3g} away); send 8-bit images "
        "(PNG/JPEG, uint8), or set quantize (--quantize) to round the inputs (the certificate is then about "
        "the rounded image)"
    )
