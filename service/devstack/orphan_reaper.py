"""``smoothcert up``'s orphan reaper: it stops the stack's processes when the launcher is gone.

The launcher's children get a signal from the kernel when it exits (``processes.parent_death``),
but a signal is all they get: a worker finishing a long task in its warm shutdown, or one that
hangs, would outlive the launcher, and so would anything left in a child's process group. The
reaper is a small process of its own (its own session, so a closed terminal does not reach
it) that reads, one JSON line each, the processes to watch and how to stop them from a pipe the
launcher holds open. The pipe ends when the launcher exits, however it exits (SIGKILL included);
the reaper then stops, last started first, whatever is still running the way the launcher
would have: each signal of the process's stop steps and its grace, then SIGKILL to its process
group, which also takes what it left behind there (a Celery worker's pool processes). After a
clean stop there is nothing left and it exits at once. Its log lines are JSON.

``python -m smoothcert.service.devstack.orphan_reaper`` runs it; :class:`OrphanReaper` starts it.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from smoothcert.service.core.logs import JsonFormatter
from smoothcert.service.devstack import processes

Steps = Sequence[tuple[signal.Signals, float]]


class OrphanReaper:
    """The launcher's side: start the reaper, tell it each process, and let it go at exit."""

    def __init__(self, log: Path):
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._pipe: IO[bytes] | None = self.proc.stdin

    def watch(self, name: str, pid: int, steps: Steps) -> None:
        """Have the reaper stop ``pid`` with ``steps`` (then its group's SIGKILL) if the launcher dies.

        A reaper that is gone is not an error: the kernel's parent-death signal still comes.
        """
        line = json.dumps(
            {"name": name, "pid": pid, "steps": [[int(sig), grace] for sig, grace in steps]}
        )
        try:
            if self._pipe is not None:
                self._pipe.write(line.encode() + b"\n")
                self._pipe.flush()
        except OSError:
            self._pipe = None

    def close(self, timeout: float = 5.0) -> None:
        """After a clean stop: end the pipe and wait for the reaper, which finds nothing to do."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Target:
    """One watched process, by pidfd where the kernel has them (no mistaking a reused pid)."""

    def __init__(self, name: str, pid: int, steps: Steps):
        self.name, self.pid, self.steps = name, pid, steps
        try:
            self.fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self.fd = -1  # already gone
        except (AttributeError, OSError):
            self.fd = None  # no pidfds here: poll the pid

    def wait(self, timeout: float) -> bool:
        """True once the process has exited (a zombie counts), waiting up to ``timeout`` seconds."""
        if self.fd == -1:
            return True
        if self.fd is not None:
            return bool(select.select([self.fd], [], [], timeout)[0])
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        try:
            if self.fd is not None and self.fd >= 0:
                signal.pidfd_send_signal(self.fd, sig)
            elif self.fd is None:
                os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


log = logging.getLogger("smoothcert.devstack.orphan_reaper")


def stop_target(target: _Target) -> None:
    """Each stop step in turn until the process has exited, then SIGKILL to its process group."""
    if not target.wait(0):
        log.warning("stopping the %s (pid %d)", target.name, target.pid)
        for sig, grace in target.steps:
            target.signal(sig)
            if target.wait(grace):
                break
    processes.kill_group(target.pid)  # the process if still there, and what it left in its group
    if not target.wait(processes.KILL_WAIT_S):
        log.error("the %s (pid %d) is still there after SIGKILL", target.name, target.pid)


def main() -> int:
    """Read the processes to watch until the pipe ends; then stop those still running."""
    for sig in (signal.SIGINT, signal.SIGHUP):  # only the pipe's end may start the stopping
        signal.signal(sig, signal.SIG_IGN)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter("orphan_reaper"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    targets: list[_Target] = []
    for line in sys.stdin.buffer:
        try:
            item = json.loads(line)
            targets.append(
                _Target(
                    item["name"],
                    int(item["pid"]),
                    [(signal.Signals(sig), float(grace)) for sig, grace in item["steps"]],
                )
            )
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable line %r", line[:200])  # a launcher killed mid-write
    running = [t for t in targets if not t.wait(0)]
    if running:
        log.warning("the launcher is gone; stopping %s", ", ".join(t.name for t in running))
    for target in reversed(targets):
        stop_target(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
