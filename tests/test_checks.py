"""The static checks of tests/support/checks.py: the one-way layers (docs/architecture.md),
stated once as import-linter contracts in pyproject.toml, function-level imports included;
mypy on every package; ruff's style rules and its format."""

from __future__ import annotations

import shutil

import pytest

from tests.support.checks import PACKAGES, format_check, lint_imports, style_check, type_check
from tests.support.paths import ROOT

pytestmark = pytest.mark.process


def test_every_layer_contract_is_kept():
    done = lint_imports()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    "module, imports, contract",
    [
        (
            "service/api/routes/_probe.py",
            "from smoothcert.worker.smoothing import sampling",
            "never import the worker",
        ),
        ("service/core/_probe.py", "import torch", "run without torch"),
        ("worker/smoothing/_probe.py", "import celery", "know nothing of the queue"),
        (
            "worker/training/_probe.py",
            "from smoothcert.service.api import app",
            "only through its shared contract",
        ),
        ("models/_probe.py", "import redis", "models/ knows nothing"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, imports, contract):
    # A lazy import counts as much as a top-level one.
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    (tmp_path / module).write_text(f"def probe():\n    {imports}\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    _, _, broken = done.stdout.partition("Broken contracts")
    assert contract in " ".join(broken.split()), done.stdout[-3000:]  # names wrap in the report


def test_every_package_type_checks():
    done = type_check()
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_the_code_follows_the_style_rules():
    done = style_check()
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_the_code_is_formatted():
    done = format_check()
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
