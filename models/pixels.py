"""Pixel batches as every model here takes them: float (N, C, H, W) in [0, 1] pixel space.

numpy only, so the API (which refuses bad inputs before queueing them), the dataset readers and
the engine share one set of checks and messages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class PixelError(ValueError):
    """An array is not a batch of [0, 1] pixels for the model; the message says why, in one line."""


def check_pixel_values(arr: np.ndarray, hint: str = " (scale 8-bit images by 1/255)") -> None:
    """Refuse NaN, infinite values and values outside [0, 1]; from the array's minimum and maximum
    alone (a NaN is both), so that no array of the inputs' size is made to check them."""
    low, high = float(arr.min()), float(arr.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise PixelError("inputs contain NaN or infinite values")
    if low < 0.0 or high > 1.0:
        raise PixelError(
            f"inputs must lie in [0, 1] pixel space, found values in [{low:g}, {high:g}]{hint}"
        )


def as_pixel_batch(arr: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """``arr`` ((C, H, W) or (N, C, H, W) with N ≥ 1, floats in [0, 1]) as contiguous float32 (N, C, H, W).

    Raises :class:`PixelError` for non-float data, another shape, NaN, infinities and values
    outside [0, 1].
    """
    if not np.issubdtype(arr.dtype, np.floating):
        raise PixelError(
            f"inputs must be floats in [0, 1], got dtype {arr.dtype} (scale 8-bit images by 1/255)"
        )
    expected = tuple(int(d) for d in input_shape)
    if arr.shape == expected:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:] != expected or arr.shape[0] == 0:
        raise PixelError(
            f"inputs have shape {list(arr.shape)}, the model takes {list(expected)} "
            f"or [N, {', '.join(map(str, expected))}]"
        )
    check_pixel_values(arr)
    return np.ascontiguousarray(arr, dtype=np.float32)
