"""The project's static checks: the layer contracts, the types, the style, the format.

``python -m tests.support.checks`` runs all four (``make lint``); tests/test_checks.py runs each.

- **Layers**: the import-linter contracts of pyproject.toml (the one-way rule).
- **Types**: mypy on the packages pyproject.toml names (every package), with pydantic's plugin.
- **Style**: ruff with pyproject.toml's settings (line length, import order).
- **Format**: ``ruff format --check`` (100 columns): run ``ruff format .`` to fix.

The editable install maps ``smoothcert.service`` to ``service/`` through an import hook, which
neither import-linter nor mypy can follow, so both run over a *namespace view*: a ``smoothcert/``
folder whose ``service``, ``worker`` and ``models`` are links to the working tree. The checks here
make a temporary one; ``python -m tests.support.checks --install-view`` (run by the Makefile's
install step) puts a lasting one on the virtual environment's path, so that ``lint-imports`` and
``mypy`` also work when called by hand. Both views link the same files the editable install maps.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.paths import ROOT

PACKAGES = ("service", "worker", "models")
BIN = Path(sys.executable).parent


def link_view(where: Path, source: Path = ROOT) -> Path:
    """Make ``where/smoothcert/{service,worker,models}`` links to the packages under ``source``."""
    namespace = where / "smoothcert"
    namespace.mkdir(parents=True, exist_ok=True)
    for package in PACKAGES:
        link = namespace / package
        if link.is_symlink():
            link.unlink()
        link.symlink_to(source / package, target_is_directory=True)
    return where


@contextlib.contextmanager
def namespace_view(source: Path = ROOT) -> Iterator[Path]:
    """A temporary namespace view of the packages under ``source``."""
    with tempfile.TemporaryDirectory(prefix="smoothcert-view-") as where:
        yield link_view(Path(where), source)


def install_view() -> Path:
    """A lasting view beside this interpreter's environment, on its path through a ``.pth`` file."""
    where = link_view(Path(sys.prefix) / "smoothcert-view")
    (Path(sysconfig.get_paths()["purelib"]) / "smoothcert-view.pth").write_text(f"{where}\n")
    return where


def _run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=600
    )


def lint_imports(source: Path = ROOT) -> subprocess.CompletedProcess:
    """``lint-imports`` over the packages under ``source`` (the checkout by default) with the
    contracts of this checkout's pyproject.toml; exit status 0 when every contract is kept."""
    with namespace_view(source) as view:
        path = os.pathsep.join(p for p in (str(view), os.environ.get("PYTHONPATH", "")) if p)
        return _run([str(BIN / "lint-imports"), "--no-cache"], ROOT, PYTHONPATH=path)


def type_check() -> subprocess.CompletedProcess:
    """mypy over the packages that pyproject.toml's ``[tool.mypy]`` names."""
    with namespace_view() as view:
        return _run(
            [str(BIN / "mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--no-incremental"],
            view,
            MYPYPATH=str(view),
        )


def style_check() -> subprocess.CompletedProcess:
    """``ruff check`` over the checkout."""
    return _run([str(BIN / "ruff"), "check", "--no-cache", "."], ROOT)


def format_check() -> subprocess.CompletedProcess:
    """``ruff format --check`` over the checkout: every file as ``ruff format`` writes it."""
    return _run([str(BIN / "ruff"), "format", "--check", "--no-cache", "."], ROOT)


CHECKS = {
    "layers": lint_imports,
    "types": type_check,
    "style": style_check,
    "format": format_check,
}


def main() -> int:
    if sys.argv[1:] == ["--install-view"]:
        print(f"namespace view: {install_view()}")
        return 0
    failed = []
    for name, check in CHECKS.items():
        done = check()
        print(f"--- {name}: {'ok' if done.returncode == 0 else 'FAILED'}")
        if done.returncode:
            failed.append(name)
            sys.stdout.write(done.stdout[-6000:])
            sys.stdout.write(done.stderr[-2000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
