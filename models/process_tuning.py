"""Process settings that make CPU inference fast, applied by the CLI and the worker at start-up.

Measured on a 2-core EPYC (docs/operations/speed.md): torch under glibc's default malloc gives
every freed block of a large batch back to the kernel and page-faults it in again on the next batch; most of
a certification's time then goes to the kernel. :func:`tune_process` therefore

- asks glibc (``mallopt``, through ctypes, so nothing has to be set before the process starts)
  to serve large blocks from the heap rather than from fresh mappings and never to trim the
  heap: the memory of the largest batch stays with the process, the peak does not grow;
- lets idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``, read when torch first loads
  OpenMP, so set before torch is imported) instead of spinning against onnxruntime and the noise
  generation on the same cores;
- gives torch's and onnxruntime's intra-op pools one thread per core of the process's CPU set,
  whatever the number of ``processes`` sharing them: an equal share (processes x threads = cores)
  was no faster for two processes on the 2-core machine (0.97x quiet, 0.74x busy;
  docs/operations/speed.md), and the idle threads sleep.

A setting the user made is kept: ``MALLOC_*`` or ``GLIBC_TUNABLES`` in the environment leave
malloc alone, ``OMP_WAIT_POLICY`` and ``OMP_NUM_THREADS`` are not overwritten, and
``SMOOTHCERT_TUNING=0`` turns all of it off. What was applied (and what was kept) is
:func:`applied`, recorded in the provenance of every result. Standard library only at import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Any

# mallopt parameter numbers of glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
MALLOC_SETTINGS = {
    "M_MMAP_MAX": (M_MMAP_MAX, 0),  # no mmap for large blocks: reuse the heap
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 2**31 - 1),  # and never shrink it
    "M_ARENA_MAX": (M_ARENA_MAX, 1),
}  # one heap, whichever thread frees
USER_MALLOC_VARS = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)
OFF_VAR = "SMOOTHCERT_TUNING"

_state: dict[str, Any] = {}


def cores() -> int:
    """CPUs this process may run on (its affinity mask, which a container's cpuset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def tune_process(processes: int = 1) -> dict[str, Any]:
    """Apply the settings above for one of ``processes`` processes sharing the cores; idempotent.

    Call it before torch is imported (the OpenMP wait policy is read then); torch's thread count
    is set here when torch is already imported, else by :func:`apply_threads` (the CLI calls it
    next, a worker in each pool process); onnxruntime sessions opened afterwards take
    :func:`threads`. Returns :func:`applied`.
    """
    if os.environ.get(OFF_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        _state.clear()
        _state.update({"tuning": "off", "threads": None})
        return applied()
    _state["tuning"] = "on"
    _state["malloc"] = _tune_malloc()
    if os.environ.get("OMP_WAIT_POLICY"):
        _state["omp_wait_policy"] = os.environ["OMP_WAIT_POLICY"] + (
            "" if _state.get("omp_wait_policy_set") else " (user)"
        )
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _state["omp_wait_policy_set"] = True
        _state["omp_wait_policy"] = "PASSIVE"
    user_threads = os.environ.get("OMP_NUM_THREADS", "").strip()
    if user_threads.isdigit() and int(user_threads) > 0:
        _state["threads"], _state["threads_source"] = int(user_threads), "OMP_NUM_THREADS"
    else:
        _state["threads"] = cores()
        _state["threads_source"] = (
            f"{cores()} cores, for each of {max(1, int(processes))} processes"
        )
    import sys

    if "torch" in sys.modules:
        apply_threads()
    return applied()


def _tune_malloc() -> str:
    """``mallopt`` the settings of :data:`MALLOC_SETTINGS` on glibc; what happened, in words."""
    if any(os.environ.get(var) for var in USER_MALLOC_VARS):  # an empty one sets nothing
        return "user (" + ", ".join(v for v in USER_MALLOC_VARS if os.environ.get(v)) + ")"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "default (not glibc)"
    if "malloc_done" in _state:
        return str(_state["malloc_done"])
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = [
            name
            for name, (param, value) in MALLOC_SETTINGS.items()
            if libc.mallopt(param, value) == 1
        ]
    except (OSError, AttributeError):
        done = []
    result = (
        " ".join(f"{name}={MALLOC_SETTINGS[name][1]}" for name in done)
        or "default (mallopt failed)"
    )
    _state["malloc_done"] = result
    return result


def threads() -> int | None:
    """The intra-op threads a runtime of this process should use; None when not tuned (keep its default)."""
    value = _state.get("threads")
    return int(value) if value else None


def apply_threads() -> None:
    """Give torch :func:`threads` intra-op threads, once per tuning (nothing when not tuned): a
    thread count the caller set afterwards (a single-threaded training run) is left alone."""
    count = threads()
    if count is not None and _state.get("threads_applied") != (os.getpid(), count):
        import torch

        torch.set_num_threads(count)
        _state["threads_applied"] = (os.getpid(), count)


def applied() -> dict[str, Any]:
    """What :func:`tune_process` did in this process ({"tuning": "not applied"} before it ran),
    for the provenance of a result."""
    if not _state:
        return {"tuning": "not applied"}
    keys = ("tuning", "malloc", "omp_wait_policy", "threads", "threads_source")
    return {k: _state[k] for k in keys if k in _state}
