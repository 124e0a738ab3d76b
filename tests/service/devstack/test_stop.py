"""``smoothcert up`` stops all it started however it is stopped: Ctrl-C, SIGTERM, its terminal
closing (SIGHUP), or a SIGKILL that leaves it no say (the kernel's parent-death signal and the
orphan reaper). Each way is tried on a real stack; the `up` started afterwards on the same port,
which would fail with "in use" behind a leftover API, is the stack the next way stops.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from smoothcert.service.devstack.redis_server import free_port
from tests.support.devstack import Up, alive, processes_with_data_dir, seed_demo, up_env
from tests.support.stack import wait_for

pytestmark = pytest.mark.process

GONE_WITHIN_S = 60.0  # the orphan reaper's longest path: 10 s warm, 5 s cold, then SIGKILL


class Stacks:
    """One `up` after another on the same port and data folder; :attr:`up` is the running one."""

    def __init__(self, data_dir, port):
        self.data_dir, self.port = data_dir, port
        self.up: Up | None = None

    def running(self) -> Up:
        if self.up is None or self.up.proc.poll() is not None:
            self.start()
        assert self.up is not None
        return self.up

    def start(self) -> Up:
        self.up = Up(up_env(self.data_dir, self.port))
        self.up.wait_banner()
        return self.up

    def close(self) -> None:
        """The last stack goes the quick way: SIGKILL, which the previous tests showed stops it all."""
        if self.up is not None:
            if self.up.proc.poll() is None:
                _kill(self.up)
                self.up.proc.wait(10)
                deadline = time.monotonic() + GONE_WITHIN_S
                while time.monotonic() < deadline and processes_with_data_dir(self.up.data_dir):
                    time.sleep(0.2)
            self.up.close()


@pytest.fixture(scope="module")
def stacks(tmp_path_factory, demo_paths):
    data_dir = tmp_path_factory.mktemp("up")
    seed_demo(data_dir, demo_paths)
    chain = Stacks(data_dir, free_port())
    yield chain
    chain.close()


def _kill(up: Up) -> None:
    os.kill(up.proc.pid, signal.SIGKILL)


WAYS = {
    "ctrl-c": (Up.ctrl_c, 0),
    "sigterm": (lambda up: up.proc.send_signal(signal.SIGTERM), 0),
    "terminal-closed": (Up.hang_up, 0),
    "sigkill": (_kill, -signal.SIGKILL),
}


@pytest.mark.parametrize("way", list(WAYS))
def test_every_process_of_the_stack_stops_and_the_port_is_free_again(stacks, way):
    up = stacks.running()
    # The worker's pool process can come up a moment after the banner and /readyz (a clean-clone run
    # once saw only the main process): wait for it, so that the snapshot below holds every process.
    wait_for(
        lambda: sum("celery_app" in c for c in up.descendants().values()) >= 2,
        60,
        "the worker's pool process",
    )
    before = up.descendants()
    commands = list(before.values())
    # What must stop: Redis, the API, the worker and its pool process(es), and the orphan reaper.
    assert any("-server" in c.split(" ")[0] for c in commands), commands
    assert any("smoothcert.service.api.server" in c for c in commands), commands
    assert sum("celery_app" in c for c in commands) >= 2, commands  # main process and pool
    assert any("devstack.orphan_reaper" in c for c in commands), commands
    stop, code = WAYS[way]
    try:
        stop(up)
        try:
            exit_code = up.proc.wait(GONE_WITHIN_S)
        except subprocess.TimeoutExpired:  # say where it hangs: what is left, what each logged
            left = {pid: cmd for pid, cmd in before.items() if alive(pid)}
            pytest.fail(
                f"`up` still running {GONE_WITHIN_S:g} s after {way}; still alive: {left}\n"
                f"{up.output[-2000:]}\n{up.log_tails()}"
            )
        assert exit_code == code, up.output
        deadline = time.monotonic() + GONE_WITHIN_S
        while time.monotonic() < deadline and (
            any(map(alive, before)) or processes_with_data_dir(up.data_dir)
        ):
            time.sleep(0.2)
        left = {pid: cmd for pid, cmd in before.items() if alive(pid)}
        assert not left, f"still running after {way}: {left}\n{up.log_tails()}"
        assert not processes_with_data_dir(up.data_dir)
    finally:
        up.close()  # and whatever it left, so that the next way starts on a free port
    stacks.start()  # a second `up` on the same port starts (and is the next way's stack)
