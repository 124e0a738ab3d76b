"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): certify, predict, certify at a radius.

- :func:`certify`, :func:`predict` (module ``certify``): CERTIFY and PREDICT with a fixed n;
- :func:`certify_at_radius` (module ``sequential``): "certified at r?" with an anytime-valid test;
- ``results``: their answers; ``sampling``: noisy copies through the model; ``memory``: how
  large a batch fits the device; ``bounds``: the statistics; ``checks``: the parameter checks all
  three share.

Same seed, same batch size and same device give bit-identical answers. Nothing here imports a
queue or a web framework: the CLI, the worker's tasks and the benchmarks all call it.
"""

from smoothcert.worker.smoothing.certify import certify, predict
from smoothcert.worker.smoothing.checks import InputError, check_params
from smoothcert.worker.smoothing.results import Answer, Certificate, Prediction, RadiusDecision, Run
from smoothcert.worker.smoothing.sampling import (
    CancelCheck,
    Canceled,
    Inputs,
    Progress,
    default_batch_size,
    noisy_copies,
)
from smoothcert.worker.smoothing.sequential import Verdict, certify_at_radius

__all__ = [
    "Answer",
    "CancelCheck",
    "Canceled",
    "Certificate",
    "InputError",
    "Inputs",
    "Prediction",
    "Progress",
    "RadiusDecision",
    "Run",
    "Verdict",
    "certify",
    "certify_at_radius",
    "check_params",
    "default_batch_size",
    "noisy_copies",
    "predict",
]
