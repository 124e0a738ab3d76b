"""One engine call for a job's typed parameters: CERTIFY, PREDICT or the test at a radius.

:class:`~smoothcert.service.core.contract.CertifyParams` say which (``mode``, ``target_radius``)
and with which of the paper's parameters; :class:`~smoothcert.worker.smoothing.options.RunOptions`
say how the call runs. The worker's jobs and the local CLI both call :func:`run_params`, so the
same parameters run the same call wherever they are given.
"""

from __future__ import annotations

from typing import Any

from smoothcert.models.base import BaseClassifier
from smoothcert.service.core.contract import CertifyParams
from smoothcert.worker.smoothing.certify import certify, predict
from smoothcert.worker.smoothing.options import RunOptions
from smoothcert.worker.smoothing.results import Run
from smoothcert.worker.smoothing.sampling import Inputs
from smoothcert.worker.smoothing.sequential import certify_at_radius


def run_params(
    model: BaseClassifier, x: Inputs, params: CertifyParams, options: RunOptions | None = None
) -> Run[Any]:
    """PREDICT (``mode="predict"``), the test at ``params.target_radius`` (n caps its draws per
    input), or CERTIFY with ``params.bound``, of ``x`` at ``params.sigma``, with ``params.noise``
    (``params.quantize``: round float inputs to the 8-bit grid for discrete noise)."""
    p = params
    noise, quantize = p.noise, p.quantize
    if p.mode == "predict":
        return predict(
            model, x, p.sigma, p.n, p.alpha, options=options, noise=noise, quantize=quantize
        )
    if p.target_radius is not None:
        return certify_at_radius(
            model,
            x,
            p.sigma,
            p.target_radius,
            p.n0,
            p.n,
            p.alpha,
            options=options,
            noise=noise,
            quantize=quantize,
        )
    return certify(
        model,
        x,
        p.sigma,
        p.n0,
        p.n,
        p.alpha,
        bound=p.bound,
        options=options,
        noise=noise,
        quantize=quantize,
    )
