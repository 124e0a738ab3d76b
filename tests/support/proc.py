"""What /proc says of a test's server processes: their memory, for tests that bound it, and
whether one is still alive."""

from __future__ import annotations

import os


def memory_bytes(pid: int, key: str = "VmHWM") -> int:
    """A memory figure of /proc/<pid>/status in bytes: VmHWM (peak resident) by default, or VmRSS."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
