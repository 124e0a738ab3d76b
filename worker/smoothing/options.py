"""How one engine call runs, apart from what it computes: :class:`RunOptions`.

The engine's functions take the paper's parameters (σ, n0, n, α, …) as parameters and everything
about running them (batch size, seed, progress, cancel check, memory budget) as one
:class:`RunOptions`. A seed and a batch size fix the noise stream: a ``batch_size`` that does not
fit the memory budget is refused, unless the caller asks for it to be lowered
(``lower_batch_size``), which changes the stream and is recorded in the provenance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Progress = Callable[[int, int], None]
"""``progress(done, total)``, called between batches: in samples, except for
``certify_at_radius``, whose sample budget is only a cap: it counts inputs settled."""
CancelCheck = Callable[[], bool]
"""``should_cancel()``, called between batches: True stops the run with ``Canceled``."""


@dataclass(frozen=True)
class RunOptions:
    """The run mechanics of one call of ``certify``, ``predict`` or ``certify_at_radius``.

    ``batch_size``: noisy copies per forward pass (None: the engine's default for the device and
    model, which fits). ``seed``: of the noise (None: drawn at random; recorded either way).
    ``progress`` and ``should_cancel``: called between batches. ``memory_budget``: bytes a batch
    may take (None: a share of the device's free memory, :func:`.memory.default_budget`).
    ``lower_batch_size``: lower a ``batch_size`` that does not fit the budget to the largest power
    of two that does, instead of refusing it (the provenance records both sizes).
    """

    batch_size: int | None = None
    seed: int | None = None
    progress: Progress | None = None
    should_cancel: CancelCheck | None = None
    memory_budget: int | None = None
    lower_batch_size: bool = False
