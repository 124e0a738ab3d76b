"""The stack's process launcher on small Python children: logs, sessions, readiness, stopping."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from smoothcert.service.devstack import processes

pytestmark = pytest.mark.process

PY = sys.executable
SLEEP = "import time; time.sleep(60)"


def python(code: str) -> list[str]:
    return [PY, "-c", code]


def test_a_child_runs_in_its_own_session_with_its_output_in_the_log(tmp_path):
    log = tmp_path / "child.log"
    log.write_text("old run\n")
    code = "import os, sys; print('session leader', os.getsid(0) == os.getpid()); print('err', file=sys.stderr)"
    assert processes.spawn(python(code), os.environ, log).wait(10) == 0
    assert log.read_text().splitlines() == [
        "session leader True",
        "err",
    ]  # the old run's text is gone
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
    proc = processes.spawn(
        python("print('\\n'.join(map(str, range(30)))); raise SystemExit(3)"), os.environ, log
    )
    proc.wait(10)
    start = time.monotonic()
    with pytest.raises(processes.ChildDied) as info:
        processes.wait_until(
            lambda: False, 60, "the API", children=[processes.Child("API", proc, log)]
        )
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert message.startswith(f"the API exited with code 3; see {log}:\n")
    assert message.splitlines()[1:] == [str(i) for i in range(15, 30)]


def test_stop_kills_the_group_of_a_child_that_ignores_sigterm(tmp_path):
    # The child ignores SIGTERM and starts a grandchild in its group, which must die with it.
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(g.pid, flush=True); time.sleep(60)"
    )
    log = tmp_path / "stubborn.log"
    proc = processes.spawn(python(code), os.environ, log)
    grandchild = int(
        processes.wait_until(lambda: log.read_text().strip(), 10, "the grandchild", interval=0.05)
    )
    processes.stop(proc, 0.5)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.05)
    assert not _alive(grandchild)
    processes.stop(proc)  # an exited child: nothing to do


def test_stop_sends_the_escalation_signals_in_turn(tmp_path):
    code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "signal.signal(signal.SIGQUIT, lambda *a: sys.exit(7)); print('up', flush=True); time.sleep(60)"
    )
    log = tmp_path / "worker.log"
    proc = processes.spawn(python(code), os.environ, log)
    processes.wait_until(lambda: "up" in log.read_text(), 10, "the child", interval=0.05)
    processes.stop(proc, 0.3, escalate=((signal.SIGQUIT, 5.0),))
    assert proc.returncode == 7


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_stop_also_kills_what_an_exited_child_left_in_its_group(tmp_path):
    # The child starts a grandchild in its group and exits at SIGTERM without it (a worker whose
    # pool process outlived it).
    code = (
        "import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', SLEEP]); "
        "print(g.pid, flush=True); time.sleep(60)"
    ).replace("SLEEP", repr(SLEEP))
    log = tmp_path / "leaves.log"
    proc = processes.spawn(python(code), os.environ, log)
    grandchild = int(
        processes.wait_until(lambda: log.read_text().strip(), 10, "the grandchild", interval=0.05)
    )
    processes.stop(proc, 10)
    assert proc.returncode == -signal.SIGTERM
    assert _gone_within(grandchild, 5)


def test_a_child_with_a_parent_death_signal_stops_when_its_parent_is_killed(tmp_path):
    # A parent (in a session of its own) spawns a child that asks for SIGTERM at its parent's death,
    # and one that does not; then the parent is SIGKILLed.
    code = f"""
import os, sys, signal, time
from pathlib import Path
from smoothcert.service.devstack import processes
sleep, tmp = [sys.executable, '-c', {SLEEP!r}], Path({str(tmp_path)!r})
a = processes.spawn(sleep, os.environ, tmp / 'a.log', parent_death_signal=signal.SIGTERM)
b = processes.spawn(sleep, os.environ, tmp / 'b.log')
print(a.pid, b.pid, flush=True)
time.sleep(60)
"""
    log = tmp_path / "parent.log"
    parent = processes.spawn(python(code), os.environ, log)
    told, untold = map(
        int,
        processes.wait_until(lambda: log.read_text().split(), 20, "the children", interval=0.05),
    )
    try:
        parent.kill()
        parent.wait(5)
        assert _gone_within(told, 10)
        assert _alive(untold)  # what the signal changes: without it, the child is orphaned
    finally:
        processes.kill_group(untold)


def test_the_orphan_reaper_stops_the_processes_of_a_killed_launcher_down_to_their_groups(
    tmp_path,
):
    # A launcher starts the orphan reaper and a child that ignores SIGTERM and SIGQUIT, with a
    # grandchild in its group, and tells the orphan reaper to stop it with SIGTERM, then SIGQUIT,
    # then the group's SIGKILL.
    child = f"""
import signal, subprocess, sys, time
for sig in (signal.SIGTERM, signal.SIGQUIT):
    signal.signal(sig, signal.SIG_IGN)
g = subprocess.Popen([sys.executable, '-c', {SLEEP!r}])
print(g.pid, flush=True)
time.sleep(60)
"""
    launcher = f"""
import os, signal, sys, time
from pathlib import Path
from smoothcert.service.devstack import processes
from smoothcert.service.devstack.orphan_reaper import OrphanReaper
tmp = Path({str(tmp_path)!r})
w = OrphanReaper(tmp / 'orphan_reaper.log')
c = processes.spawn([sys.executable, '-c', {child!r}], os.environ, tmp / 'child.log')
w.watch('stubborn', c.pid, ((signal.SIGTERM, 0.5), (signal.SIGQUIT, 0.5)))
print(w.proc.pid, c.pid, flush=True)
time.sleep(60)
"""
    log = tmp_path / "launcher.log"
    proc = processes.spawn(python(launcher), os.environ, log)
    reaper, stubborn = map(
        int,
        processes.wait_until(lambda: log.read_text().split(), 20, "the launcher", interval=0.05),
    )
    grandchild = int(
        processes.wait_until(
            lambda: (tmp_path / "child.log").read_text().strip(),
            20,
            "the grandchild",
            interval=0.05,
        )
    )
    try:
        proc.kill()
        proc.wait(5)
        for pid in (stubborn, grandchild, reaper):
            assert _gone_within(pid, 15), (pid, (tmp_path / "orphan_reaper.log").read_text())
        lines = [
            json.loads(line) for line in (tmp_path / "orphan_reaper.log").read_text().splitlines()
        ]
        assert [e["message"] for e in lines] == [
            "the launcher is gone; stopping stubborn",
            f"stopping the stubborn (pid {stubborn})",
        ]
    finally:
        processes.kill_group(stubborn)


def test_after_a_clean_stop_the_orphan_reaper_has_nothing_to_do(tmp_path):
    from smoothcert.service.devstack.orphan_reaper import OrphanReaper

    reaper = OrphanReaper(tmp_path / "orphan_reaper.log")
    child = processes.spawn(
        python("import time; time.sleep(60)"), os.environ, tmp_path / "child.log"
    )
    reaper.watch("sleeper", child.pid, ((signal.SIGTERM, 5.0),))
    processes.stop(child, 5)
    reaper.close()
    assert reaper.proc.returncode == 0
    assert (tmp_path / "orphan_reaper.log").read_text() == ""


def _gone_within(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    return not _alive(pid)
