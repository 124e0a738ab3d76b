"""Drawing discrete noise on the device: offsets j by binary search of 60-bit uniforms in the
integer thresholds of :mod:`.discrete`, added to the grid levels in integers, clipped, and
converted to float once.

A binary search per pixel (``torch.searchsorted``) is slow on a CPU, so the search starts from a
table of the uniforms' top 16 bits: a 16-bit bucket holds at most one threshold except where the
law's tails pack many into a tiny probability, and only the pixels that land there (a few in
10^4) go through the full search. The result is the full search's, bit for bit: the table only
skips comparisons whose outcome it knows. Everything stays on the model's device; the generator
is the run's own.
"""

from __future__ import annotations

import torch

from smoothcert.worker.smoothing.discrete import LEVELS, UNIFORM_BITS, Thresholds

_BUCKET_BITS = 16
_SHIFT = UNIFORM_BITS - _BUCKET_BITS
_LOW_MASK = (1 << _SHIFT) - 1
# A bucket's entry packs the thresholds below it (high bits) and the low bits of the one threshold
# inside it (or 2^SHIFT, above every low part, when none is): one gather per pixel.
_COUNT_SHIFT = _SHIFT + 1


class GridNoise:
    """The sampler of :class:`~.discrete.Thresholds` on ``device``."""

    def __init__(self, table: Thresholds, device: torch.device):
        self.table = table
        self.device = device
        values = torch.from_numpy(table.values)
        edges = torch.arange(1 << _BUCKET_BITS, dtype=torch.int64) << _SHIFT
        below = torch.searchsorted(values, edges, right=False)  # thresholds < bucket start
        upto = torch.searchsorted(values, edges + _LOW_MASK, right=True)  # ≤ bucket end
        inside = upto - below
        padded = torch.cat([values, torch.tensor([1 << UNIFORM_BITS])])
        low = torch.where(
            inside == 1, padded[below] & _LOW_MASK, torch.full_like(below, 1 << _SHIFT)
        )
        self.values = values.to(device)
        self.entries = ((below << _COUNT_SHIFT) | low).to(device)
        self.crowded = (inside > 1).to(device)

    def offsets(
        self, shape: torch.Size | tuple[int, ...], generator: torch.Generator
    ) -> torch.Tensor:
        """Offsets j (int64, ``shape``) with P(j) = ΔT/2^60: j = −M + #{i : T_i ≤ U}."""
        u = torch.randint(
            0, 1 << UNIFORM_BITS, shape, generator=generator, dtype=torch.int64, device=self.device
        )
        return self.offsets_of(u)

    def offsets_of(self, u: torch.Tensor) -> torch.Tensor:
        """The offsets of uniforms ``u`` (int64 in [0, 2^60)): the full binary search's answer."""
        bucket = u >> _SHIFT
        entry = self.entries[bucket]
        count = (entry >> _COUNT_SHIFT).add_((u & _LOW_MASK) >= (entry & ((1 << _COUNT_SHIFT) - 1)))
        crowded = self.crowded[bucket].nonzero(as_tuple=True)
        if crowded[0].numel():
            count[crowded] = torch.searchsorted(self.values, u[crowded], right=True)
        return count.sub_(self.table.offset)

    def noisy(
        self, levels: torch.Tensor, generator: torch.Generator, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(levels + j) clipped to [−255K, 255(K+1)], divided by 255 once: float32 like ``out``."""
        z = self.offsets(levels.shape, generator).add_(levels)
        z.clamp_(self.table.low, self.table.high)
        if out is None:
            return z.to(torch.float32).div_(LEVELS)
        return out.copy_(z).div_(LEVELS)
