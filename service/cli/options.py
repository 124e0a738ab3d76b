"""The flags that the in-process commands (certify, predict) and the service's (submit, models upload) share.

Each adder defines its flags once: names, types, metavars, choices and the defaults of
:mod:`smoothcert.service.core.params`. ``local=True`` is for a command that runs the engine in
this process: a flag takes its default here and the help says "(default X)". ``local=False``
is for one that asks the service: a flag stays None unless given, so the service applies the
same default, and the help says "(server default X)". Adders take a parser or an argument group
and add in the order that ``--help`` lists. :func:`check_bounds` refuses values outside the bounds
of :mod:`smoothcert.service.core.params` before a model is loaded or a request is sent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from smoothcert.service.core import params
from smoothcert.service.core.contract import CertifyParams
from smoothcert.service.core.params import (
    BOUNDS,
    DEFAULT_ALPHA,
    DEFAULT_BOUND,
    DEFAULT_N,
    DEFAULT_N0,
)

INPUTS_HELP = ".npy of shape (N,C,H,W) or (C,H,W) in [0,1], or PNG/JPEG files or folders"

Flags = argparse._ActionsContainer  # an ArgumentParser or an argument group


def _default(value: Any, local: bool) -> str:
    return f"default {value}" if local else f"server default {value}"


def add_inputs(p: Flags, *, required: bool = True) -> None:
    """``--inputs PATH ...``: one .npy, or images and folders of them (not required in a group of sources)."""
    p.add_argument("--inputs", nargs="+", required=required, metavar="PATH", help=INPUTS_HELP)


def add_labels(p: Flags, *, local: bool) -> None:
    """``--labels PATH``: the true labels, to count correct rows here or the accuracy on the service."""
    purpose = " to mark correct rows" if local else ": adds the accuracy"
    p.add_argument(
        "--labels",
        metavar="LABELS",
        help=f"true labels: .npy, a file with one per line, or a comma list such as 0,1,2{purpose}",
    )


def add_sigma(p: Flags) -> None:
    """``--sigma``, required: the smoothing noise level."""
    p.add_argument(
        "--sigma",
        type=float,
        required=True,
        help=f"noise level σ, in [0,1] pixel units, at most {params.MAX_SIGMA:g}",
    )


def add_samples(p: Flags, *, local: bool) -> None:
    """CERTIFY's ``--n0`` (selection) and ``--n`` (estimation) sample counts."""
    p.add_argument(
        "--n0",
        type=int,
        default=DEFAULT_N0 if local else None,
        help=f"samples to select the class ({_default(DEFAULT_N0, local)})",
    )
    p.add_argument(
        "--n",
        type=int,
        default=DEFAULT_N if local else None,
        help=f"samples to bound its probability ({_default(DEFAULT_N, local)})",
    )


def add_run_options(p: Flags, *, local: bool) -> None:
    """``--alpha``, ``--batch-size`` and ``--seed``, which CERTIFY and PREDICT both take."""
    p.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA if local else None,
        help=f"failure probability in [{params.MIN_ALPHA:g}, {params.MAX_ALPHA:g}] "
        f"({_default(DEFAULT_ALPHA, local)})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="noisy samples per forward pass" + (" (default: by input size)" if local else ""),
    )
    p.add_argument(
        "--seed",
        type=int,
        help="noise seed (default: drawn "
        + ("at random" if local else "by the server")
        + " and recorded)",
    )


def add_certify_options(p: Flags, *, local: bool) -> None:
    """CERTIFY's ``--bound`` and ``--target-radius``."""
    p.add_argument(
        "--bound",
        choices=BOUNDS,
        default=DEFAULT_BOUND if local else None,
        help=_default(DEFAULT_BOUND, local),
    )
    drawing = ", drawing until the answer is known" if local else ""
    cap = "the cap per input" if local else "the cap"
    p.add_argument(
        "--target-radius",
        type=float,
        metavar="R",
        help=f"only decide 'certified at radius R?'{drawing} (anytime-valid; --n is then {cap})",
    )


def certify_params(args: argparse.Namespace, model_id: str) -> CertifyParams:
    """The typed contract's parameters that the flags above give (a flag left None, as the
    service's commands leave them, takes the shared default, which the service applies too)."""
    flags = ("n0", "n", "alpha", "bound", "mode", "batch_size", "seed", "target_radius")
    chosen = ("runtime", "precision", "noise", "quantize")
    given = {name: getattr(args, name, None) for name in (*flags, *chosen)}
    return CertifyParams(model_id, args.sigma, **{k: v for k, v in given.items() if v is not None})


def check_bounds(args: argparse.Namespace, *, certify: bool) -> None:
    """ValueError (the engine's message) for a ``--sigma`` above MAX_SIGMA, an ``--alpha`` outside
    [MIN_ALPHA, MAX_ALPHA], or, when ``certify`` (CERTIFY with a fixed n), an ``--n`` too small for
    any certificate at that alpha and bound. Flags left at None take the defaults the service
    applies; other wrong values (σ ≤ 0, n < 1, ...) are left to the engine's or the service's checks."""
    if args.sigma is not None and args.sigma > 0:
        params.check_sigma_bound(args.sigma)
    if args.alpha is not None:
        params.check_alpha_bound(args.alpha)
    if args.sigma is not None:
        params.check_noise(
            getattr(args, "noise", None) or params.DEFAULT_NOISE,
            args.sigma,
            bool(getattr(args, "quantize", None)),
        )
    n = DEFAULT_N if args.n is None else args.n
    if certify and n >= 1:
        params.check_certify_n(
            n, DEFAULT_ALPHA if args.alpha is None else args.alpha, args.bound or DEFAULT_BOUND
        )


def add_model_fields(p: Flags, *, local: bool) -> None:
    """``--arch``, ``--input-shape``, ``--num-classes`` and ``--normalization``: what a model file
    without smoothcert metadata cannot say itself (``local``: a file loaded here; else an upload)."""
    p.add_argument(
        "--arch",
        help="architecture name, e.g. digits_cnn, cifar_resnet20"
        if local
        else "architecture, required for bare safetensors weights, e.g. digits_cnn",
    )
    p.add_argument(
        "--input-shape",
        help="C,H,W, e.g. 3,32,32" + ("" if local else " (read from ONNX and smoothcert files)"),
    )
    p.add_argument("--num-classes", type=int)
    p.add_argument("--normalization", help='JSON, e.g. {"mean": [0.5], "std": [0.25]}')


def add_runtime(p: Flags, *, local: bool) -> None:
    """``--runtime``: what evaluates the model (auto: the fastest, measured once per model and cached)."""
    where = "here" if local else "on the worker's device"
    p.add_argument(
        "--runtime",
        choices=params.RUNTIMES,
        default=params.DEFAULT_RUNTIME if local else None,
        help=f"auto: the fastest {where}, measured once per model; torch or onnxruntime pin one "
        f"(an ONNX model runs in onnxruntime only) ({_default(params.DEFAULT_RUNTIME, local)})",
    )


def add_precision(p: Flags, *, local: bool) -> None:
    """``--precision``: the model's arithmetic (the noise stays float32)."""
    p.add_argument(
        "--precision",
        choices=params.PRECISIONS,
        default=params.DEFAULT_PRECISION if local else None,
        help="float32, or float16 (torch on a CUDA device) or bfloat16 (torch); the noise is drawn and "
        f"added in float32 ({_default(params.DEFAULT_PRECISION, local)})",
    )


def add_noise(p: Flags, *, local: bool) -> None:
    """``--noise`` (gaussian or discrete) and ``--quantize`` (round float inputs onto the 8-bit
    grid, which discrete noise needs)."""
    p.add_argument(
        "--noise",
        choices=params.NOISES,
        default=params.DEFAULT_NOISE if local else None,
        help="gaussian: N(0, σ²) in float32; discrete: the discretised Gaussian on the 8-bit grid, "
        "drawn exactly in integers, so that the certificate holds in floating point (inputs on "
        f"the grid, σ at most {params.MAX_DISCRETE_SIGMA:g}) ({_default(params.DEFAULT_NOISE, local)})",
    )
    p.add_argument(
        "--quantize",
        action="store_true",
        default=False if local else None,
        help="with --noise discrete: round float inputs onto the 8-bit grid instead of refusing "
        "inputs off it (the certificate is then about the rounded image)",
    )


def add_device(p: Flags) -> None:
    """``--device`` of a command that runs a model in this process."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def add_out(p: Flags, *, local: bool) -> None:
    """``--out TSV``: where :func:`write_out` puts the rows and their provenance."""
    rows = "rows" if local else "the rows"
    p.add_argument(
        "--out",
        metavar="TSV",
        help=f"write {rows} here (default stdout) and provenance to TSV.json",
    )


def write_out(text: str, out: str | None, provenance: dict[str, Any] | None = None) -> None:
    """``text`` to the file ``out``, or to stdout without one; with ``out``, ``provenance`` (when
    given) as indented JSON to ``out`` + ".json"."""
    if not out:
        sys.stdout.write(text)
        return
    Path(out).write_text(text)
    if provenance is not None:
        Path(out + ".json").write_text(json.dumps(provenance, indent=2) + "\n")
