"""The ``--models`` option the benchmarks share: a comma-separated subset of their plan."""

from __future__ import annotations

import argparse
from collections.abc import Iterable


def add_models(p: argparse.ArgumentParser, known: Iterable[str]) -> None:
    names = ",".join(known)
    p.add_argument(
        "--models",
        default=names,
        type=lambda s: s.split(","),
        help=f"some of {names.replace(',', ', ')}",
    )


def check_models(
    p: argparse.ArgumentParser, args: argparse.Namespace, known: Iterable[str]
) -> None:
    """A usage error (exit 2) naming the known models when ``--models`` names another."""
    known = list(known)
    unknown = sorted(set(args.models) - set(known))
    if unknown:
        p.error(f"unknown models {', '.join(unknown)}; use some of {', '.join(known)}")
