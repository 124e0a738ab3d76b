"""Progress bars of the in-process commands: tqdm on stderr, silent when stderr is not a terminal,
so piped or logged output stays clean."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm


@contextmanager
def stderr_bar(total: int, unit: str, **options: Any) -> Iterator[tqdm]:
    """A tqdm bar of ``total`` ``unit``s (more tqdm ``options`` as given), closed on leaving."""
    bar = tqdm(
        total=total,
        unit=unit,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
        **options,
    )
    try:
        yield bar
    finally:
        bar.close()
