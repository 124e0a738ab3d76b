"""The engine's public names under the module path the queue's tasks import
(``from smoothcert.worker.smoothing import engine``); the package itself exports the same."""
from smoothcert.worker.smoothing.certify import certify, predict
from smoothcert.worker.smoothing.checks import InputError
from smoothcert.worker.smoothing.results import Answer, Certificate, Prediction, RadiusDecision, Run
from smoothcert.worker.smoothing.sampling import CancelCheck, Canceled, Inputs, Progress, default_batch_size
from smoothcert.worker.smoothing.sequential import certify_at_radius

__all__ = [
    "Answer", "CancelCheck", "Canceled", "Certificate", "InputError", "Inputs", "Prediction", "Progress",
    "RadiusDecision", "Run", "certify", "certify_at_radius", "default_batch_size", "predict",
]
