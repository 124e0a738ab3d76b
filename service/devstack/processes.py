"""Child processes of a local stack (``smoothcert up``, the test stack, the benchmarks): start, await, stop.

A child runs in its own session, so it is the leader of a new process group: a Ctrl-C in the
terminal reaches only the parent, which stops its children in order, and a final SIGKILL of
the group also takes a child's own children (a Celery worker's pool processes). Its stdout and
stderr go to one log file, whose tail explains a child that dies early.

A child's log can instead be rotated (``rotation``): its output then comes through a pipe to a
thread of the parent, which writes it to the log and, past ``max_bytes``, renames the log ``.1``
(the older ones ``.2``, ``.3``, ... up to ``backups``, the oldest deleted) and starts it afresh, so
a child that writes without end (a flood of requests to the API) takes at most
``(1 + backups) x max_bytes`` of disk. ``smoothcert up`` rotates the API's and the worker's logs.

A child can also be told to stop when its parent is gone (``parent_death``): on Linux the kernel
sends it that signal when the parent exits, however it exits, SIGKILL included. ``smoothcert up``
asks for it; a production server, run by its own supervisor, never gets it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from io import BufferedReader
from pathlib import Path
from typing import NamedTuple, TypeVar

T = TypeVar("T")
KILL_WAIT_S = 5.0  # after SIGKILL; bounded, so a child stuck in the kernel cannot hang its parent
TAIL_LINES = 15
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Loaded before any fork: the child between fork and exec only calls it.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class Child(NamedTuple):
    """A started child, the name messages give it, and its log (None when it has none)."""

    name: str
    proc: subprocess.Popen
    log: Path | None = None


class LogRotation(NamedTuple):
    """A child's log is rotated past ``max_bytes``, keeping ``backups`` older files."""

    max_bytes: int
    backups: int


class RotatingLog:
    """Appends to ``path``; a write that would take it past ``max_bytes`` first renames it
    ``path.1`` (``.1`` to ``.2``, and so on up to ``backups``; the oldest is deleted) and opens a
    new ``path``. With no backups the log is emptied instead."""

    def __init__(self, path: Path, rotation: LogRotation, *, append: bool = True):
        self.path, self.rotation = Path(path), rotation
        self._out = open(self.path, "ab" if append else "wb")

    def write(self, data: bytes) -> None:
        size = self._out.tell()
        if size and size + len(data) > self.rotation.max_bytes:
            self.rotate()
        self._out.write(data)
        self._out.flush()

    def rotate(self) -> None:
        self._out.close()
        backups = self.rotation.backups
        for index in range(backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        if backups:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._out = open(self.path, "wb")

    def close(self) -> None:
        self._out.close()


def _relay(source: BufferedReader, log: RotatingLog, line_limit: int) -> None:
    """Copy ``source`` to ``log`` line by line (a line longer than ``line_limit`` in pieces)."""
    try:
        while line := source.readline(line_limit):
            log.write(line)
    except (OSError, ValueError):
        pass
    finally:
        source.close()
        log.close()


# Relay threads of children whose logs rotate, by pid: stop() waits for the last lines.
_relays: dict[int, threading.Thread] = {}


class ChildDied(RuntimeError):
    """A child exited on its own; the message names it, its exit code and its log, with the log's tail."""


class NotReady(TimeoutError):
    """A readiness check stayed false for the whole timeout."""


def parent_death(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when this process exits.

    Linux only (None elsewhere). It runs in the child between fork and exec, and the signal stays
    set across the exec. The kernel ties it to the thread that forks, so fork from the main thread.
    A parent that died before the child asked has the child exit at once: no signal would come.
    """
    if _LIBC is None:
        return None
    parent = os.getpid()

    def ask() -> None:
        if _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(70)

    return ask


def spawn(
    args: Sequence[str],
    env: Mapping[str, str],
    log: Path,
    *,
    append: bool = False,
    parent_death_signal: signal.Signals | None = None,
    rotation: LogRotation | None = None,
) -> subprocess.Popen:
    """Start ``args`` with ``env`` in a new session, stdin empty, stdout and stderr into ``log``.

    ``log`` is truncated unless ``append`` (a stack restarted in the same folder keeps its history).
    With ``parent_death_signal``, the child gets that signal when this process exits (:func:`parent_death`).
    With ``rotation``, the output goes through a thread of this process that rotates ``log``.
    """
    preexec = parent_death(parent_death_signal) if parent_death_signal is not None else None
    if rotation is not None:
        proc = subprocess.Popen(
            list(args),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )
        assert proc.stdout is not None
        relay = threading.Thread(
            target=_relay,
            args=(proc.stdout, RotatingLog(log, rotation, append=append), rotation.max_bytes),
            name=f"log-{Path(log).name}",
            daemon=True,
        )
        relay.start()
        _relays[proc.pid] = relay
        return proc
    with open(log, "ab" if append else "wb") as out:
        return subprocess.Popen(
            list(args),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )


def log_tail(log: Path | None, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of ``log`` ("" when there is no log or it cannot be read)."""
    if log is None:
        return ""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def check_alive(children: Iterable[Child]) -> None:
    """Raise ChildDied for the first of ``children`` that has exited."""
    for child in children:
        if child.proc.poll() is not None:
            _wait_for_log(child.proc, 1.0)
            raise ChildDied(
                f"the {child.name} exited with code {child.proc.returncode}; see {child.log}:\n"
                f"{log_tail(child.log)}"
            )


def wait_until(
    check: Callable[[], T],
    timeout: float,
    what: str,
    *,
    children: Iterable[Child] = (),
    ignore: tuple[type[BaseException], ...] = (),
    interval: float = 0.1,
) -> T:
    """Poll ``check()`` until it returns something truthy, and return that.

    Before each try, ChildDied is raised when one of ``children`` has exited: a server that
    crashed on start-up fails at once, not after the timeout. Exceptions of the ``ignore`` types
    count as "not yet" (a connection refused while a server starts). Raises NotReady, naming
    ``what``, after ``timeout`` seconds.
    """
    children = list(children)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_alive(children)
        try:
            value = check()
            if value:
                return value
        except ignore:
            pass
        time.sleep(interval)
    raise NotReady(f"{what} not ready within {timeout:.0f} s")


def stop(
    proc: subprocess.Popen,
    timeout: float = 15.0,
    *,
    escalate: Sequence[tuple[signal.Signals, float]] = (),
) -> None:
    """Stop ``proc``, a child from :func:`spawn`: SIGTERM and up to ``timeout`` seconds, then each
    ``(signal, grace)`` of ``escalate`` in turn, then SIGKILL to its whole process group.

    The signals before the last go to the child alone, so it can shut its own children down.
    The group's SIGKILL comes even after the child has exited: what it left behind in its group
    (a pool process of a worker that died) goes with it.
    """
    for sig, grace in ((signal.SIGTERM, timeout), *escalate):
        if proc.poll() is not None:
            break
        try:
            proc.send_signal(sig)
            proc.wait(grace)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    kill_group(proc.pid)
    try:
        proc.wait(KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        pass
    _wait_for_log(proc, KILL_WAIT_S)


def _wait_for_log(proc: subprocess.Popen, timeout: float) -> None:
    """Give the relay of ``proc``'s rotated log up to ``timeout`` seconds to write its last lines."""
    relay = _relays.get(proc.pid)
    if relay is not None:
        relay.join(timeout)
        if not relay.is_alive():
            _relays.pop(proc.pid, None)


def kill_group(pgid: int) -> None:
    """SIGKILL to process group ``pgid``; nothing when it has no members left.

    Safe after its leader has exited: Linux gives no new process an id still in use as a group's.
    """
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
