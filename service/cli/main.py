"""The `smoothcert` command line.

Subcommands that run a model (certify, predict) import torch lazily, so `smoothcert analyze` and
the API process stay torch-free. The subcommands that talk to a running service (submit, status,
wait, cancel, models, datasets) live in cli_remote.py. Expected failures (bad input, unreadable
files, API errors) end with a one-line message on stderr and exit status 2; set SMOOTHCERT_DEBUG=1
to see the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from smoothcert.service.cli import options
from smoothcert.service.cli.progress import stderr_bar
from smoothcert.service.cli.remote import add_commands as add_remote_commands
from smoothcert.service.cli.signing_key import add_commands as add_signing_key_commands
from smoothcert.service.cli.train import add_commands as add_train_commands
from smoothcert.service.cli.verify import add_command as add_verify_command
from smoothcert.service.core.contract import CertifyParams
from smoothcert.service.core.inputs import image_files, load_inputs, load_labels
from smoothcert.service.core.model_store import ModelStore
from smoothcert.service.core.params import DEFAULT_PREDICT_N, Mode
from smoothcert.service.core.settings import Settings
from smoothcert.service.core.tsv import format_tsv

# The commands that run a model in this process; they tune it first
# (smoothcert.models.process_tuning).
MODEL_COMMANDS = frozenset({"certify", "predict", "train", "import-checkpoint", "experiment"})


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `smoothcert` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [
        "worker"
    ]:  # everything after `worker` belongs to `celery worker`, options first
        return _worker_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command in MODEL_COMMANDS:
        from smoothcert.models import process_tuning  # stdlib only: before torch is imported

        process_tuning.tune_process()
        process_tuning.apply_threads()  # now, before a command's own thread settings (training's)
    try:
        return args.handler(args) or 0
    except (ValueError, OSError) as exc:  # every error class of ours derives from ValueError
        if os.environ.get("SMOOTHCERT_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"smoothcert: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("smoothcert: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoothcert", description="Certified robustness by randomized smoothing."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    certify = commands.add_parser(
        "certify", help="certify inputs: class and certified l2 radius, or abstain"
    )
    _model_and_inputs(certify)
    options.add_samples(certify, local=True)
    options.add_certify_options(certify, local=True)
    _certificate_options(certify)
    certify.set_defaults(handler=_run_certify)

    predict = commands.add_parser(
        "predict", help="predict with the smoothed classifier, or abstain"
    )
    _model_and_inputs(predict)
    predict.add_argument(
        "--n", type=int, default=DEFAULT_PREDICT_N, help="samples per input (default %(default)s)"
    )
    _certificate_options(predict)
    predict.set_defaults(handler=_run_predict)

    analyze = commands.add_parser(
        "analyze", help="certified accuracy at radii from certification TSV files"
    )
    analyze.add_argument("files", nargs="+", metavar="FILE")
    analyze.add_argument("--radii", help="comma-separated radii (default 0,0.25,...,4)")
    analyze.add_argument("--format", choices=("table", "json", "tsv"), default="table")
    analyze.add_argument("--plot", metavar="PNG", help="also draw the curves into this PNG")
    analyze.set_defaults(handler=_run_analyze)

    up = commands.add_parser(
        "up", help="run the local stack: Redis, the API and one worker (SMOOTHCERT_* settings)"
    )
    up.set_defaults(handler=lambda args: _stack_main())
    worker = commands.add_parser(
        "worker", help="run a Celery worker; further options go to `celery worker`", add_help=False
    )
    worker.add_argument("celery_args", nargs=argparse.REMAINDER)
    worker.set_defaults(handler=lambda args: _worker_main(args.celery_args))

    add_train_commands(commands)  # train, import-checkpoint, experiment: in-process
    add_remote_commands(commands)  # submit, status, wait, cancel, models, datasets: over HTTP
    add_verify_command(commands)  # verify: a certificate, offline
    add_signing_key_commands(commands)  # signing-key show|rotate: on the API's host
    return parser


def _certificate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--certificate",
        metavar="OUT.json",
        help="also write the run's certificate (the service's format: docs/certificate.md)",
    )
    p.add_argument(
        "--signing-key",
        metavar="KEY.pem",
        help="sign the certificate with this Ed25519 private key (PKCS#8 PEM); without it the "
        "certificate is unsigned",
    )


def _certificate(args, params: CertifyParams, model, x, run, labels) -> None:
    """Write ``--certificate`` when it was asked for."""
    if not args.certificate:
        return
    from smoothcert.service.cli import local_certificate

    rows = _rows(args, run)
    keyid = local_certificate.write(
        args.certificate, params, model.info, x, rows, run.provenance, labels, args.signing_key
    )
    signed = f"signed with key {keyid[:16]}" if keyid else "unsigned (no --signing-key)"
    print(f"wrote the certificate {args.certificate}, {signed}", file=sys.stderr)


def _stack_main() -> int:
    from smoothcert.service.devstack.stack import main as stack_main

    return stack_main([])


def _worker_main(argv: list[str]) -> int:
    from smoothcert.worker.queue.celery_app import main as worker_main

    worker_main(argv)
    return 0


def _model_and_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="an .onnx or .safetensors file, or the id of a model stored under SMOOTHCERT_DATA_DIR",
    )
    p.add_argument(
        "--denoiser",
        metavar="DENOISER",
        help="certify MODEL behind this denoiser (denoised smoothing): a denoiser .safetensors file "
        "(smoothcert train-denoiser), or the id of one stored under SMOOTHCERT_DATA_DIR",
    )
    options.add_inputs(p)
    options.add_labels(p, local=True)
    options.add_sigma(p)
    options.add_run_options(p, local=True)
    options.add_device(p)
    options.add_runtime(p, local=True)
    options.add_precision(p, local=True)
    options.add_noise(p, local=True)
    options.add_out(p, local=True)
    options.add_model_fields(
        p.add_argument_group("bare safetensors weights (files without smoothcert metadata)"),
        local=True,
    )


def _run_certify(args) -> int:
    from smoothcert.worker.smoothing import run_params

    options.check_bounds(args, certify=args.target_radius is None)
    model, x, labels = _prepare(args)
    params = _params(args)
    x = _rounded(x, params)
    # --n caps a target-radius run, whose bar counts inputs settled instead of samples
    unit = "samples" if args.target_radius is None else "inputs settled"
    with _progress_bar(unit) as progress, _batch_size_refused():
        run = run_params(model, x, params, _run_options(args, progress))
    _write(args, run, labels)
    _certificate(args, params, model, x, run, labels)
    if args.target_radius is None:
        certified = sum(not r.abstained for r in run.results)
        what = f"certified {certified} of {len(run.results)} inputs ({len(run.results) - certified} abstained)"
    else:
        certified = sum(r.certified_at_r for r in run.results)
        what = (
            f"certified {certified} of {len(run.results)} inputs at radius {args.target_radius} with "
            f"{run.provenance['samples_used'] / len(run.results):,.0f} samples per input"
        )
    print(f"{what}{_accuracy(run, labels)} in {run.provenance['elapsed_s']:.1f} s", file=sys.stderr)
    return 0


def _run_predict(args) -> int:
    from smoothcert.worker.smoothing import run_params

    options.check_bounds(args, certify=False)
    model, x, labels = _prepare(args)
    params = _params(args, mode="predict")
    x = _rounded(x, params)
    with _progress_bar() as progress, _batch_size_refused():
        run = run_params(model, x, params, _run_options(args, progress))
    _write(args, run, labels)
    _certificate(args, params, model, x, run, labels)
    answered = sum(not r.abstained for r in run.results)
    print(
        f"predicted {answered} of {len(run.results)} inputs{_accuracy(run, labels)}"
        f" in {run.provenance['elapsed_s']:.1f} s",
        file=sys.stderr,
    )
    return 0


def _run_analyze(args) -> int:
    from smoothcert.worker.evaluation.analyze import run_cli

    return run_cli(args.files, args.radii, args.format, args.plot)


def _params(args, mode: Mode = "certify") -> CertifyParams:
    """The typed parameters of a local certify or predict (the model's runtime and precision are
    chosen by :func:`_prepare`; these say what the engine computes)."""
    return dataclasses.replace(options.certify_params(args, args.model), mode=mode)


def _rounded(x, params: CertifyParams):
    """The inputs ``--quantize`` rounds onto the 8-bit grid (discrete noise), so that the rows,
    the certificate's digests and the engine all see the rounded image; others as given."""
    if not (params.noise == "discrete" and params.quantize):
        return x
    import numpy as np

    from smoothcert.service.core.grid import LEVELS, grid_levels

    return (grid_levels(np.asarray(x), quantize=True) / np.float32(LEVELS)).astype(np.float32)


def _run_options(args, progress):
    """The engine's run options of a local certify or predict: ``--batch-size`` and ``--seed`` as
    given, never lowered (a batch size that does not fit is refused: :func:`_batch_size_refused`)."""
    from smoothcert.worker.smoothing import RunOptions

    return RunOptions(batch_size=args.batch_size, seed=args.seed, progress=progress)


@contextmanager
def _batch_size_refused():
    """The engine's refusal of a ``--batch-size`` beyond the device's memory, in the CLI's words."""
    from smoothcert.worker.smoothing import BatchSizeError

    try:
        yield
    except BatchSizeError as exc:
        raise ValueError(
            f"--batch-size {exc.requested} does not fit this device's memory: at most "
            f"{exc.fits} noisy copies of this model fit a batch ({exc.budget:,} bytes, a share of "
            f"what is free); give --batch-size {exc.fits} or less, or leave it out to have one "
            "chosen that fits"
        ) from None


def _prepare(args):
    from smoothcert.models.runtimes import select_runtime
    from smoothcert.worker.smoothing import default_batch_size

    model = _load(args)
    batch = args.batch_size or default_batch_size(model.info.input_shape, model.device, model)
    model = select_runtime(
        model, args.runtime, batch_size=batch, cache_dir=cache_dir(), precision=args.precision
    )
    x = load_inputs(args.inputs, model.info.input_shape)
    labels = None
    if args.labels:
        labels = load_labels(args.labels, 1 if x.ndim == 3 else len(x))
    return model, x, labels


def _load(args):
    """MODEL (and ``--denoiser``) is a file, or else the id of a model in the store under
    SMOOTHCERT_DATA_DIR; with ``--denoiser`` the two are one pipeline model."""
    if args.denoiser is None:
        model = _load_classifier(args)
        if not hasattr(model, "logits"):
            raise ValueError(
                f"{args.model} is a denoiser: give a classifier as MODEL and this with --denoiser"
            )
        return model
    from smoothcert.models.pipeline import compose  # torch: only for the model commands

    return compose(load_denoiser_arg(args.denoiser, args.device), _load_classifier(args))


def load_denoiser_arg(path: str, device: str):
    """A denoiser file, or else the id of a denoiser stored under SMOOTHCERT_DATA_DIR."""
    from smoothcert.models.denoisers import load_denoiser
    from smoothcert.models.loaders import load_stored_model

    if Path(path).exists():
        return load_denoiser(path, device=device)
    store = ModelStore(Settings().models_dir)
    meta = store.get(path)
    if meta is None:
        raise ValueError(f"no such file: {path} (nor a denoiser with that id in {store.root})")
    return load_stored_model(store, meta, device)


def load_classifier_arg(model: str, device: str):
    """A self-describing classifier file, or else the id of a classifier stored under SMOOTHCERT_DATA_DIR."""
    return _load_classifier(
        argparse.Namespace(
            model=model,
            device=device,
            input_shape=None,
            arch=None,
            num_classes=None,
            normalization=None,
        )
    )


def _load_classifier(args):
    """MODEL is a file, or else the id of a model in the store under SMOOTHCERT_DATA_DIR."""
    from smoothcert.models.loaders import (
        load_model,
        load_stored_model,
    )  # torch: only for the model commands

    if not Path(args.model).exists():
        store = ModelStore(Settings().models_dir)
        meta = store.get(args.model)
        if meta is None:
            raise ValueError(
                f"no such file: {args.model} (nor a model with that id in {store.root})"
            )
        return load_stored_model(store, meta, args.device)
    input_shape = None
    if args.input_shape:
        try:
            shape = tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3:
            raise ValueError(f"--input-shape must look like 3,32,32, got {args.input_shape!r}")
        input_shape = shape
    return load_model(
        args.model,
        device=args.device,
        arch=args.arch,
        input_shape=input_shape,
        num_classes=args.num_classes,
        normalization=args.normalization,
    )


def cache_dir() -> Path:
    """Where the CLI keeps runtime choices and ONNX exports: ``$XDG_CACHE_HOME/smoothcert``
    (default ``~/.cache/smoothcert``); safe to delete."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smoothcert"


@contextmanager
def _progress_bar(unit: str = "samples"):
    """A progress callback drawing a bar of ``unit`` on stderr, silent when stderr is not a
    terminal."""
    with stderr_bar(0, unit, unit_scale=unit == "samples") as bar:

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield update


def _rows(args, run) -> list[dict]:
    """The run's rows, each named by its image file when the inputs were images."""
    rows = [r.to_dict() for r in run.results]
    paths = [Path(p) for p in args.inputs]
    if not (len(paths) == 1 and paths[0].suffix == ".npy"):
        names = [f.name for f in image_files(paths)]
        for row in rows:
            row["name"] = names[row["index"]]
    return rows


def _write(args, run, labels) -> None:
    text = format_tsv(_rows(args, run), None if labels is None else labels.tolist())
    options.write_out(text, args.out, run.provenance)


def _accuracy(run, labels) -> str:
    """With labels: how many answers match them, and for a certify run how many of those are
    certified too (the count behind certified accuracy), each of all the inputs."""
    if labels is None:
        return ""
    total = len(run.results)
    right = [r for r in run.results if r.prediction == int(labels[r.index])]
    said = f"; {len(right)} of {total} predicted the label"
    if run.results and hasattr(run.results[0], "certified_at_r"):
        certified = sum(bool(r.certified_at_r) for r in right)
        return f"{said}, {certified} of {total} certified at the radius with the label"
    if run.results and hasattr(run.results[0], "radius"):
        certified = sum(r.radius > 0 for r in right)
        return f"{said}, {certified} of {total} certified with the label"
    return said
