"""What /proc says of a test's server processes: their memory, for tests that bound it."""
from __future__ import annotations


def memory_bytes(pid: int, key: str = "VmHWM") -> int:
    """A memory figure of /proc/<pid>/status in bytes: VmHWM (peak resident) by default, or VmRSS."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024      # the kernel writes kB
    raise AssertionError(f"no {key} in /proc/{pid}/status")
