"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): certify, predict, certify at a radius.

- :func:`certify`, :func:`predict` (module ``certify``): CERTIFY and PREDICT with a fixed n;
- :func:`certify_at_radius` (module ``sequential``): "certified at r?" with an anytime-valid test;
- :func:`run_params` (module ``run``): whichever of the three a job's typed parameters ask for;
- :class:`RunOptions` (module ``options``): how a call runs (batch size, seed, progress, cancel
  check, memory budget, whether a batch size that does not fit may be lowered);
- ``results``: their answers; ``sampling``: noisy copies through the model; ``memory``: how
  large a batch fits the device; ``bounds``: the statistics; ``checks``: the parameter checks all
  three share.

Same seed, same batch size and same device give bit-identical answers. Nothing here imports a
queue or a web framework: the CLI, the worker's tasks and the benchmarks all call it.
"""

from smoothcert.worker.smoothing.certify import certify, predict
from smoothcert.worker.smoothing.checks import BatchSizeError, InputError, check_params
from smoothcert.worker.smoothing.options import CancelCheck, Progress, RunOptions
from smoothcert.worker.smoothing.results import Answer, Certificate, Prediction, RadiusDecision, Run
from smoothcert.worker.smoothing.run import run_params
from smoothcert.worker.smoothing.sampling import (
    Canceled,
    Inputs,
    default_batch_size,
    noisy_copies,
)
from smoothcert.worker.smoothing.sequential import Verdict, certify_at_radius

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
