"""How many noisy copies one batch may hold: what a copy costs, and what the device has free.

A batch holds its noisy copies, the model's intermediate results and scores, and a few integers
per copy that count the votes. :func:`fit_batch` keeps a batch size that fits a memory budget, by
default a quarter of what the device has free when the run starts (the rest is left to the other
pool processes on the same device and to the model's own workspace), and lowers one that does not
to the largest power of two that does: so that small changes in free memory rarely change the
batch size, and with it the noise stream. The engine lowers a batch size the caller gave only
when the caller asks for it, and otherwise refuses it (``sampling.fitting_batch_size``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from smoothcert.models.base import BaseClassifier

BUDGET_FRACTION = 0.25
FALLBACK_BYTES = 1 << 30  # what a host that says nothing about its memory is assumed to have free
# Per copy: the int64 sample number, input, stage, vote slot and label of sampling.py, and spare.
COUNTING_BYTES = 64
_MEMINFO = Path("/proc/meminfo")
_CGROUP = Path("/sys/fs/cgroup")


def bytes_per_copy(model: BaseClassifier) -> int:
    """Memory one more noisy copy adds to a batch: the float32 copy, the model's intermediate
    results (:meth:`~smoothcert.models.base.BaseClassifier.work_bytes_per_sample`), its scores
    counted as float64 with their finiteness flags, and the counting."""
    channels, height, width = model.info.input_shape
    classes = model.info.num_classes
    return (
        4 * channels * height * width + model.work_bytes_per_sample() + 9 * classes + COUNTING_BYTES
    )


def default_budget(device: torch.device) -> int:
    """BUDGET_FRACTION of the memory ``device`` has free now."""
    return int(BUDGET_FRACTION * free_bytes(device))


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device``: for CUDA what the driver reports free plus what torch's cache
    holds unused; for the CPU the host's MemAvailable, within the cgroup's limit when there is one
    (a container), else :data:`FALLBACK_BYTES`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return host_available_bytes()


def host_available_bytes(meminfo: Path = _MEMINFO, cgroup: Path = _CGROUP) -> int:
    """MemAvailable of ``meminfo`` (a /proc/meminfo), bounded by the cgroup v2 limit under ``cgroup``
    less its usage; :data:`FALLBACK_BYTES` when neither can be read."""
    known = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                known.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            known.append(max(0, int(limit) - int((cgroup / "memory.current").read_text())))
    except (OSError, ValueError):
        pass
    if not known and hasattr(os, "sysconf"):
        try:
            known.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    return min(known) if known else FALLBACK_BYTES


MAX_GPU_BATCH = 1 << 14  # beyond this a GPU is busy anyway, and one batch's votes wait too long


def batch_for_memory(per_copy: int, free: int, cap: int = MAX_GPU_BATCH) -> int:
    """The default batch of a GPU: the largest power of two of copies of ``per_copy`` bytes that fits
    BUDGET_FRACTION of ``free`` bytes, at most ``cap`` (a power of two), at least 1."""
    return min(cap, fit_batch(cap, per_copy, int(BUDGET_FRACTION * free)))


def copies_that_fit(per_copy: int, budget: int) -> int:
    """How many copies of ``per_copy`` bytes fit ``budget`` bytes (at least 1)."""
    return max(1, budget // max(1, per_copy))


def fit_batch(requested: int, per_copy: int, budget: int) -> int:
    """``requested`` when that many copies of ``per_copy`` bytes fit ``budget``, else the largest
    power of two that does (at least 1)."""
    fits = copies_that_fit(per_copy, budget)
    return requested if requested <= fits else 1 << (fits.bit_length() - 1)
