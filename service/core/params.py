"""The parameters of CERTIFY and PREDICT that every side shares: defaults, bounds and allowed values.

The API's schemas, the CLI and the engine take their defaults from here, so a default changes in
one place. Standard library only: the API and the CLI import this without torch.
"""
from __future__ import annotations

import secrets
from typing import Final, Literal, get_args

Bound = Literal["cohen", "top2"]
"""How CERTIFY bounds the selected class: Cohen et al.'s one-class bound, or the two-class one."""
Mode = Literal["certify", "predict"]

BOUNDS: Final[tuple[Bound, ...]] = get_args(Bound)
MODES: Final[tuple[Mode, ...]] = get_args(Mode)

DEFAULT_N0: Final = 100          # samples that select the class
DEFAULT_N: Final = 100_000       # samples that bound its probability (the cap of a target-radius run)
DEFAULT_ALPHA: Final = 0.001     # failure probability of each answer
DEFAULT_PREDICT_N: Final = 1_000  # samples of PREDICT when called in-process (CLI, engine)

MAX_SEED: Final = 2**63 - 1      # the largest seed accepted (a torch generator takes 64 bits)
DRAWN_SEED_BOUND: Final = 2**53  # seeds drawn by the API stay exact in JavaScript clients


def draw_seed(below: int = MAX_SEED) -> int:
    """A fresh random seed in [0, below), for a call that was given none; the caller records it."""
    return secrets.randbelow(below)
