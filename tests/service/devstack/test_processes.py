"""The stack's process launcher on small Python children: logs, sessions, readiness, stopping."""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from smoothcert.service.devstack import processes

PY = sys.executable


def python(code: str) -> list[str]:
    return [PY, "-c", code]


def test_a_child_runs_in_its_own_session_with_its_output_in_the_log(tmp_path):
    log = tmp_path / "child.log"
    log.write_text("old run\n")
    code = "import os, sys; print('session leader', os.getsid(0) == os.getpid()); print('err', file=sys.stderr)"
    assert processes.spawn(python(code), os.environ, log).wait(10) == 0
    assert log.read_text().splitlines() == ["session leader True", "err"]   # the old run's text is gone
    processes.spawn(python("print('again')"), os.environ, log, append=True).wait(10)
    assert log.read_text().splitlines() == ["session leader True", "err", "again"]


def test_wait_until_returns_the_first_truthy_value_and_ignores_what_it_is_told_to():
    calls = iter([ConnectionError(), 0, [], "ready"])

    def check():
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    assert processes.wait_until(check, 5, "it", ignore=(ConnectionError,), interval=0.01) == "ready"
    with pytest.raises(processes.NotReady, match="^it not ready within 0 s$"):
        processes.wait_until(lambda: False, 0.05, "it", interval=0.01)


def test_a_child_that_dies_fails_the_wait_at_once_with_its_log_tail(tmp_path):
    log = tmp_path / "api.log"
    proc = processes.spawn(python("print('\\n'.join(map(str, range(30)))); raise SystemExit(3)"), os.environ, log)
    proc.wait(10)
    start = time.monotonic()
    with pytest.raises(processes.ChildDied) as info:
        processes.wait_until(lambda: False, 60, "the API", children=[processes.Child("API", proc, log)])
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert message.startswith(f"the API exited with code 3; see {log}:\n")
    assert message.splitlines()[1:] == [str(i) for i in range(15, 30)]


def test_stop_kills_the_group_of_a_child_that_ignores_sigterm(tmp_path):
    # The child ignores SIGTERM and starts a grandchild in its group, which must die with it.
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print(g.pid, flush=True); time.sleep(60)")
    log = tmp_path / "stubborn.log"
    proc = processes.spawn(python(code), os.environ, log)
    grandchild = int(processes.wait_until(lambda: log.read_text().strip(), 10, "the grandchild", interval=0.05))
    processes.stop(proc, 0.5)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.05)
    assert not _alive(grandchild)
    processes.stop(proc)   # an exited child: nothing to do


def test_stop_sends_the_escalation_signals_in_turn(tmp_path):
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "signal.signal(signal.SIGQUIT, lambda *a: sys.exit(7)); print('up', flush=True); time.sleep(60)")
    log = tmp_path / "worker.log"
    proc = processes.spawn(python(code), os.environ, log)
    processes.wait_until(lambda: "up" in log.read_text(), 10, "the child", interval=0.05)
    processes.stop(proc, 0.3, escalate=((signal.SIGQUIT, 5.0),))
    assert proc.returncode == 7


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"   # a zombie has exited
    except FileNotFoundError:
        return False
