"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): certify, predict, certify at a radius.

- :func:`certify`, :func:`predict` (module ``certify``): CERTIFY and PREDICT with a fixed n;
- :func:`certify_at_radius` (module ``sequential``): "certified at r?" with an anytime-valid test;
- :func:`run_params` (module ``run``): whichever of the three a job's typed parameters ask for;
- :class:`RunOptions` (module ``options``): how a call runs (batch size, seed, progress, cancel
  check, memory budget, whether a batch size that does not fit may be lowered);
- ``results``: their answers; ``sampling``: noisy copies through the model; ``memory``: how
  large a batch fits the device; ``bounds``: the statistics; ``checks``: the parameter checks all
  three share; ``discrete`` (torch-free) and ``grid_noise``: the law and the sampler of
  ``noise="discrete"``, the discretised Gaussian on the 8-bit grid drawn exactly in integers.

Same seed, same batch size and same device give bit-identical answers. Nothing here imports a
queue or a web framework: the CLI, the worker's tasks and the benchmarks all call it.

The names above are imported when first used (PEP 562), not with the package: ``bounds`` and
``results`` need no torch, so ``import smoothcert.worker.smoothing.bounds`` (``smoothcert
verify``) stays torch-free, while ``from smoothcert.worker.smoothing import certify`` loads the
engine as it always did.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names are, for type checkers; imported lazily below
    from smoothcert.worker.smoothing.certify import certify, predict
    from smoothcert.worker.smoothing.checks import BatchSizeError, InputError, check_params
    from smoothcert.worker.smoothing.options import CancelCheck, Progress, RunOptions
    from smoothcert.worker.smoothing.results import (
        Answer,
        Certificate,
        Prediction,
        RadiusDecision,
        Run,
    )
    from smoothcert.worker.smoothing.run import run_params
    from smoothcert.worker.smoothing.sampling import (
        Canceled,
        Inputs,
        default_batch_size,
        noisy_copies,
    )
    from smoothcert.worker.smoothing.sequential import Verdict, certify_at_radius

# Each re-exported name and the submodule that defines it.
_EXPORTS = {
    "certify": "certify",
    "predict": "certify",
    "BatchSizeError": "checks",
    "InputError": "checks",
    "check_params": "checks",
    "CancelCheck": "options",
    "Progress": "options",
    "RunOptions": "options",
    "Answer": "results",
    "Certificate": "results",
    "Prediction": "results",
    "RadiusDecision": "results",
    "Run": "results",
    "run_params": "run",
    "Canceled": "sampling",
    "Inputs": "sampling",
    "default_batch_size": "sampling",
    "noisy_copies": "sampling",
    "Verdict": "sequential",
    "certify_at_radius": "sequential",
}

__all__ = [
    "Answer",
    "BatchSizeError",
    "CancelCheck",
    "Canceled",
    "Certificate",
    "InputError",
    "Inputs",
    "Prediction",
    "Progress",
    "RadiusDecision",
    "Run",
    "RunOptions",
    "Verdict",
    "certify",
    "certify_at_radius",
    "check_params",
    "default_batch_size",
    "noisy_copies",
    "predict",
    "run_params",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once: later lookups find it without this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The package's module type. Importing the submodule ``certify`` binds it as the package's
    attribute ``certify`` (the import system does so for every submodule); the package's
    ``certify`` is the function, as when it was imported eagerly, so the function replaces it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            isinstance(value, types.ModuleType)
            and value.__name__ == f"{__name__}.{name}"
            and _EXPORTS.get(name) == name
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
