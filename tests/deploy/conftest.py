"""The measured times of the container fault tests, printed after the run (`make deploy-test`)."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter):
    rows = [
        (report.nodeid.rpartition("::")[2], name, value)
        for report in terminalreporter.getreports("passed") + terminalreporter.getreports("failed")
        for name, value in report.user_properties
        if name.endswith("_s")
    ]
    if rows:
        terminalreporter.section("deployment: measured times")
        for test, name, value in rows:
            terminalreporter.write_line(f"{test}: {name} = {value:.1f}")
