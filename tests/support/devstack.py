"""``smoothcert up`` as a person runs it: the real command in a terminal of its own.

The terminal is a pseudo-terminal whose slave is the launcher's controlling terminal, so that
typing Ctrl-C (writing ``^C`` to the master) sends SIGINT as a keyboard would, and closing the
master hangs the terminal up as closing its window does (SIGHUP, and writes that fail). Every
process of the stack is found through /proc: the launcher's descendants, and whatever carries
the stack's data folder in its environment (which every child inherits).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

# Run in the new session: make the terminal on stdin the controlling one, then become `smoothcert up`.
_CONTROLLING_TTY = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
)
UP_COMMAND = ("-m", "smoothcert.service.cli", "up")
BANNER_END = "Ctrl-C stops everything"


def up_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of a `smoothcert up` on ``port`` keeping everything in ``data_dir``: no
    SMOOTHCERT_* setting of the caller's, so keys and the Redis password are generated as `make up` does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMOOTHCERT_")}
    return {
        **env,
        "SMOOTHCERT_PORT": str(port),
        "SMOOTHCERT_DATA_DIR": str(data_dir.resolve()),
        "SMOOTHCERT_DEVICE": "cpu",
        **extra,
    }


def seed_demo(data_dir: Path, demo_paths: dict[str, Path]) -> None:
    """Put the session's demo files where `up` looks for them, so that it does not train them again."""
    (data_dir / "demo").mkdir(parents=True, exist_ok=True)
    for key in ("safetensors", "test_x", "test_y"):
        shutil.copy(demo_paths[key], data_dir / "demo" / demo_paths[key].name)


class Up:
    """One `smoothcert up` launcher in its own session and terminal; :meth:`close` always cleans up."""

    def __init__(self, env: dict[str, str]):
        self.env, self.data_dir = env, Path(env["SMOOTHCERT_DATA_DIR"]).resolve()
        self.url = f"http://127.0.0.1:{env['SMOOTHCERT_PORT']}"
        master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CONTROLLING_TTY, *UP_COMMAND],
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self._master: int | None = master
        self._chunks: list[bytes] = []
        self._reading = True
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while self._reading:
            if not select.select([self._master], [], [], 0.1)[0]:
                continue
            try:
                data = os.read(self._master, 4096)
            except OSError:  # EIO: every holder of the slave has gone
                return
            if not data:
                return
            self._chunks.append(data)

    @property
    def output(self) -> str:
        return b"".join(self._chunks).decode(errors="replace").replace("\r\n", "\n")

    def wait_banner(self, timeout: float = 180.0) -> str:
        """Wait until the launcher printed its banner (the stack is ready, the demo registered)."""
        deadline = time.monotonic() + timeout
        while BANNER_END not in self.output:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"no banner from smoothcert up (exit {self.proc.poll()}):\n{self.output}\n"
                    f"{self.log_tails()}"
                )
            time.sleep(0.2)
        assert httpx.get(f"{self.url}/readyz", timeout=10).status_code == 200
        return self.output

    @property
    def api_key(self) -> str:
        return re.search(r"API key: (\S+)", self.output).group(1)

    def log_tails(self) -> str:
        logs = sorted((self.data_dir / "logs").glob("*.log"))
        return "\n".join(
            f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            for log in logs
        )

    def descendants(self) -> dict[int, str]:
        """pid -> command line of every live process below the launcher."""
        table = _processes()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _state, _cmd) in table.items():
            children.setdefault(ppid, []).append(pid)
        found: dict[int, str] = {}
        todo = [self.proc.pid]
        while todo:
            for pid in children.get(todo.pop(), []):
                if pid in table and table[pid][1] != "Z":
                    found[pid] = table[pid][2]
                    todo.append(pid)
        return found

    def child(self, word: str) -> int:
        """The pid of the launcher's one child whose command line holds ``word``."""
        table = _processes()
        (pid,) = [
            pid
            for pid, (ppid, state, cmd) in table.items()
            if ppid == self.proc.pid and state != "Z" and word in cmd
        ]
        return pid

    def environ(self, pid: int) -> dict[str, str]:
        """The environment ``pid`` was started with (what the launcher handed its children)."""
        raw = Path(f"/proc/{pid}/environ").read_bytes()
        return dict(
            item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item
        )

    def ctrl_c(self) -> None:
        os.write(self._master, b"\x03")

    def hang_up(self) -> None:
        """Close the terminal: the kernel sends SIGHUP to the launcher, and its writes fail from then on."""
        self._reading = False
        self._reader.join(5)
        master, self._master = self._master, None
        if master is not None:
            os.close(master)

    def close(self) -> None:
        """Stop the launcher if it runs, then SIGKILL whatever of this stack is left (a failed test's)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in processes_with_data_dir(self.data_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.hang_up()


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process /proc shows."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (
                (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
        table[int(stat.parent.name)] = (int(fields[1]), fields[0], cmdline.strip())
    return table


def alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def processes_with_data_dir(data_dir: Path) -> list[int]:
    """Live processes started with SMOOTHCERT_DATA_DIR=``data_dir``: a stack's, however they came to be."""
    marker = f"SMOOTHCERT_DATA_DIR={data_dir}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0") and alive(int(environ.parent.name)):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found
