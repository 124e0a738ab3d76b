"""The shared certification parameters: the values, the seeds drawn, and that the module stays stdlib-only."""

import ast
import sys
from pathlib import Path
from typing import get_args

from smoothcert.service.core import params


def test_defaults_and_bounds_keep_their_values():
    assert (
        params.DEFAULT_N0,
        params.DEFAULT_N,
        params.DEFAULT_ALPHA,
        params.DEFAULT_PREDICT_N,
    ) == (100, 100_000, 0.001, 1_000)
    assert params.MAX_SEED == 2**63 - 1 and params.DRAWN_SEED_BOUND == 2**53
    assert params.BOUNDS == get_args(params.Bound) == ("cohen", "top2")
    assert params.MODES == get_args(params.Mode) == ("certify", "predict")


def test_drawn_seeds_lie_below_their_bound():
    assert all(0 <= params.draw_seed(params.DRAWN_SEED_BOUND) < 2**53 for _ in range(200))
    assert all(0 <= params.draw_seed() < params.MAX_SEED for _ in range(200))
    assert {params.draw_seed(2) for _ in range(200)} == {0, 1}


def test_the_module_imports_only_the_standard_library():
    tree = ast.parse(Path(params.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {name.split(".")[0] for name in names} <= set(sys.stdlib_module_names) | {"__future__"}
