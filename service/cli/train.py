"""`smoothcert train`, `import-checkpoint` and `experiment`: making models in-process.

Registered on the main parser by :func:`add_commands`. Handlers import torch (through
``smoothcert.worker``) only when they run, so `smoothcert analyze` and the API stay torch-free.
Expected failures raise ValueError subclasses, which `smoothcert` prints as one line; progress
bars go to stderr and stay quiet when it is not a terminal.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from smoothcert.service.cli import remote
from smoothcert.service.cli.options import add_device
from smoothcert.service.cli.progress import stderr_bar
from smoothcert.service.core.train_config import (
    DENOISER_SCHEDULES,
    METHODS,
    OBJECTIVES,
    OPTIMIZERS,
    STABILITY_NEEDS_CLASSIFIER,
    DenoiserConfig,
    DiffusionConfig,
    TrainConfig,
)
from smoothcert.worker.evaluation import denoised
from smoothcert.worker.evaluation.experiment import (
    ExperimentConfig,
    render_markdown,
    run_experiment,
)


def _field_defaults(config: Any) -> dict[str, Any]:
    """A config dataclass's plain defaults by field name (a drawn one, as a seed's, is left out)."""
    return {f.name: f.default for f in fields(config) if f.default is not MISSING}


_DEFAULTS = _field_defaults(TrainConfig)
_EXPERIMENT = _field_defaults(ExperimentConfig)
_DENOISER = _field_defaults(DenoiserConfig)
_DENOISED = _field_defaults(denoised.DenoisedConfig)
_DIFFUSION = _field_defaults(DiffusionConfig)
_NORMALIZATIONS = "cifar10, cifar10-center, imagenet, imagenet-center, none"


class CliArgumentError(ValueError):
    """A command-line value that cannot be used; one line."""


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `train`, `train-denoiser`, `import-checkpoint` and `experiment` on the `smoothcert` subparsers."""
    _add_train(commands)
    _add_train_denoiser(commands)
    _add_import(commands)
    _add_experiment(commands)
    _add_train_diffusion(commands)


def _add_train(commands) -> None:
    p = commands.add_parser(
        "train",
        help="train a base classifier that smooths well (gaussian, smoothed, smoothadv)",
        description="Train a base classifier and write it as one self-describing "
        "safetensors file that `smoothcert certify` takes as it is.",
    )
    p.add_argument(
        "--dataset",
        default="digits",
        help="digits (default), an .npz with x (N,C,H,W in [0,1] or uint8) and y, an image folder "
        "(one sub-folder per class), or a CIFAR-10 binary folder (data_batch_*.bin, test_batch.bin)",
    )
    p.add_argument(
        "--arch", default=_DEFAULTS["arch"], help=f"architecture (default {_DEFAULTS['arch']})"
    )
    p.add_argument(
        "--method", choices=METHODS, default=_DEFAULTS["method"], help="default gaussian"
    )
    p.add_argument(
        "--sigma",
        type=float,
        default=_DEFAULTS["sigma"],
        help=f"training noise σ in [0,1] pixel units (default {_DEFAULTS['sigma']})",
    )
    p.add_argument(
        "--epochs", type=int, default=_DEFAULTS["epochs"], help=f"default {_DEFAULTS['epochs']}"
    )
    p.add_argument(
        "--seed",
        type=int,
        help="seed of every random draw (default: the checkpoint's when resuming, "
        "else drawn and recorded)",
    )
    p.add_argument(
        "--out",
        metavar="MODEL.safetensors",
        help="where to write the model (default DATASET-ARCH-METHOD-sigmaS.safetensors)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=_DEFAULTS["batch_size"],
        help=f"images per step (default {_DEFAULTS['batch_size']})",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=_DEFAULTS["lr"],
        help=f"initial learning rate, cosine to 0 (default {_DEFAULTS['lr']})",
    )
    p.add_argument(
        "--optimizer", choices=OPTIMIZERS, default=_DEFAULTS["optimizer"], help="default adam"
    )
    p.add_argument(
        "--m",
        type=int,
        default=_DEFAULTS["m"],
        help=f"noise samples per image, smoothed and smoothadv (default {_DEFAULTS['m']})",
    )
    p.add_argument(
        "--epsilon",
        type=float,
        default=_DEFAULTS["epsilon"],
        help="smoothadv: l2 radius of the attack in [0,1] pixel units; Salman et al.'s "
        f"--epsilon 64 is 64/256 = 0.25 (default {_DEFAULTS['epsilon']})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=_DEFAULTS["steps"],
        help=f"smoothadv: PGD steps (default {_DEFAULTS['steps']})",
    )
    p.add_argument(
        "--warmup-epochs",
        type=int,
        default=_DEFAULTS["warmup_epochs"],
        help="smoothadv: epochs over which epsilon grows to its value "
        f"(default {_DEFAULTS['warmup_epochs']})",
    )
    p.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="save the state after each epoch here, and resume from it when it is there",
    )
    add_device(p)
    p.add_argument("--name", help="the model's name in its metadata")
    remote.add_training_options(p)
    p.set_defaults(handler=_run_train)


def _add_image_dataset(p: argparse.ArgumentParser) -> None:
    """--dataset of the commands that train on images alone (their labels are not used)."""
    p.add_argument(
        "--dataset",
        default="digits",
        help="digits (default), an .npz with x (N,C,H,W in [0,1] or uint8) and y, an image folder, or a "
        "CIFAR-10 binary folder",
    )


def _add_schedule(p: argparse.ArgumentParser, defaults: dict) -> None:
    """--epochs, --batch-size and --lr (Adam, cosine to 0) with ``defaults``."""
    p.add_argument("--epochs", type=int, default=defaults["epochs"], help="default %(default)s")
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults["batch_size"],
        help="images per step (default %(default)s)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=defaults["lr"],
        help="initial Adam learning rate, cosine to 0 (default %(default)s)",
    )


def _add_run(p: argparse.ArgumentParser) -> None:
    """--seed, --checkpoint-dir and --device, which every training command takes."""
    p.add_argument(
        "--seed",
        type=int,
        help="seed of every random draw (default: the checkpoint's when resuming, "
        "else drawn and recorded)",
    )
    p.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="save the state after each epoch here, and resume from it when it is there",
    )
    add_device(p)


def _add_train_denoiser(commands) -> None:
    p = commands.add_parser(
        "train-denoiser",
        help="train a denoiser for denoised smoothing (mse or stability)",
        description="Train a DnCNN denoiser D at noise level σ so that a classifier that "
        "never saw noise can be certified as f(D(x + δ)) (`smoothcert certify "
        "CLASSIFIER --denoiser FILE`); writes one self-describing safetensors file.",
    )
    d = _DENOISER
    _add_image_dataset(p)
    p.add_argument("--sigma", type=float, required=True, help="noise level σ in [0,1] pixel units")
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=d["objective"],
        help="mse: ||D(x+δ) - x||²; stability: cross-entropy of the frozen classifier on D(x+δ) against "
        "its label on x, needs --classifier (default %(default)s)",
    )
    p.add_argument(
        "--classifier",
        metavar="MODEL",
        help="the frozen classifier (.safetensors file or stored id); required by stability, "
        "measured on with mse",
    )
    p.add_argument(
        "--init",
        metavar="DENOISER",
        help="start from this denoiser's weights (file or stored id, same depth and width), e.g. "
        "fine-tune an mse denoiser with stability as Salman et al. do; without it, stability "
        "first trains that mse denoiser itself (--mse-epochs)",
    )
    p.add_argument(
        "--out",
        metavar="DENOISER.safetensors",
        help="where to write it (default DATASET-dncnn-OBJECTIVE-sigmaS.safetensors)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=d["epochs"],
        help="epochs of the objective; stability without --init trains --mse-epochs of mse "
        "before them (default %(default)s)",
    )
    p.add_argument(
        "--mse-epochs",
        type=int,
        metavar="N",
        help="stability without --init: epochs of the mse stage trained first, with mse's batch "
        "size and learning rate, and started from (default: --epochs; 0: stability from scratch)",
    )
    schedules = ", ".join(f"{b} for {o}" for o, (b, _) in DENOISER_SCHEDULES.items())
    p.add_argument(
        "--batch-size", type=int, help=f"images per step of the objective (default {schedules})"
    )
    rates = ", ".join(f"{lr:g} for {o}" for o, (_, lr) in DENOISER_SCHEDULES.items())
    p.add_argument(
        "--lr",
        type=float,
        help=f"initial Adam learning rate of the objective, cosine to 0 (default {rates})",
    )
    p.add_argument(
        "--depth", type=int, default=d["depth"], help="DnCNN convolutions (default %(default)s)"
    )
    p.add_argument(
        "--width", type=int, default=d["width"], help="DnCNN channels (default %(default)s)"
    )
    _add_run(p)
    p.add_argument("--name", help="the denoiser's name in its metadata")
    remote.add_training_options(p)
    p.set_defaults(handler=_run_train_denoiser)


def _add_import(commands) -> None:
    p = commands.add_parser(
        "import-checkpoint",
        help="convert a local PyTorch checkpoint (Cohen/Salman layout) to safetensors",
        description="Read a local torch.save checkpoint laid out as Cohen et al.'s and "
        "Salman et al.'s releases ({'arch', 'state_dict'} of "
        "Sequential(normalization, network)) with torch.load(weights_only=True) "
        "and write a self-describing safetensors file.",
    )
    p.add_argument("checkpoint", metavar="FILE")
    p.add_argument(
        "--normalization",
        required=True,
        help=f"the first layer the network was trained behind: {_NORMALIZATIONS}, or JSON "
        '{"mean": [...], "std": [...] or null}. Cohen et al.: cifar10 / imagenet; Salman et '
        "al.'s SmoothAdv release: cifar10-center / imagenet-center (mean only)",
    )
    p.add_argument("--arch", help="allow-listed architecture (default: the checkpoint's own arch)")
    p.add_argument(
        "--sigma", type=float, help="training noise σ (default: read from a noise_S path component)"
    )
    p.add_argument("--input-shape", help="C,H,W (default: the architecture's)")
    p.add_argument("--name", help="the model's name in its metadata (default: the file name)")
    p.add_argument(
        "--out", metavar="MODEL.safetensors", help="default: FILE with the suffix .safetensors"
    )
    p.set_defaults(handler=_run_import)


def _add_experiment(commands) -> None:
    p = commands.add_parser(
        "experiment",
        help="train gaussian, smoothed and smoothadv on digits, certify, compare "
        "(--denoised: a classifier without noise behind denoisers)",
        description="Train each method at each σ on the digits training split, certify the "
        "test split, and write the certified-accuracy table and curves. With "
        "--denoised, the denoised-smoothing comparison instead, at one σ: a classifier "
        "trained with Gaussian noise, one trained without noise alone, and that one "
        "behind a DnCNN trained with MSE, behind the MSE denoiser fine-tuned with the "
        "stability objective (batch 32, lr 3e-4), and behind a one-step diffusion "
        "denoiser; every trained file lands in OUT_DIR/models and works with "
        "`smoothcert certify CLASSIFIER --denoiser FILE`.",
    )
    d, e = _EXPERIMENT, _DENOISED
    p.add_argument(
        "--denoised",
        action="store_true",
        help="run the denoised-smoothing comparison (rows: --rows) instead of the training methods'",
    )
    p.add_argument(
        "--out-dir", help="default var/experiment (var/experiment-denoised with --denoised)"
    )
    p.add_argument(
        "--methods",
        help="comma-separated from gaussian, smoothed, smoothadv, standard (default the "
        "first three; not with --denoised)",
    )
    p.add_argument(
        "--rows",
        help=f"--denoised: comma-separated rows from {', '.join(denoised.ROWS)} (default all); a "
        "row trains what it stands on (stability: the standard classifier and the MSE "
        "denoiser it starts from)",
    )
    p.add_argument(
        "--sigmas",
        help="comma-separated training and certification σ (default "
        f"{','.join(f'{s:g}' for s in d['sigmas'])}; with --denoised one σ, default "
        f"{e['sigma']:g})",
    )
    p.add_argument(
        "--radii",
        help="comma-separated radii of the table (default "
        f"{','.join(f'{r:g}' for r in d['radii'])}; with --denoised "
        f"{','.join(f'{r:g}' for r in e['radii'])})",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help=f"training epochs per classifier (default {d['epochs']}; {e['epochs']} with --denoised)",
    )
    p.add_argument(
        "--denoiser-epochs",
        type=int,
        help=f"--denoised: epochs of the MSE denoiser, and of its stability fine-tuning "
        f"(default {e['denoiser_epochs']})",
    )
    p.add_argument(
        "--diffusion-epochs",
        type=int,
        help="--denoised: epochs of the diffusion denoiser (default: train-diffusion's)",
    )
    p.add_argument(
        "--m", type=int, help=f"noise samples per image, smoothed and smoothadv (default {d['m']})"
    )
    p.add_argument(
        "--epsilon", type=float, help=f"smoothadv attack radius (default {d['epsilon']})"
    )
    p.add_argument("--steps", type=int, help=f"smoothadv PGD steps (default {d['steps']})")
    p.add_argument(
        "--warmup-epochs",
        type=int,
        help=f"smoothadv epsilon warm-up epochs (default {d['warmup_epochs']})",
    )
    p.add_argument(
        "--batch-size", type=int, help=f"classifier training batch (default {d['batch_size']})"
    )
    p.add_argument("--lr", type=float, help=f"classifier learning rate (default {d['lr']})")
    p.add_argument("--n0", type=int, help=f"certification selection samples (default {d['n0']})")
    p.add_argument(
        "--n",
        type=int,
        help=f"certification samples (default {d['n']}; 10000 reaches radius 1.5 at σ=0.5)",
    )
    p.add_argument("--alpha", type=float, help=f"default {d['alpha']}")
    p.add_argument(
        "--seed",
        type=int,
        help=f"seed of every training and of the certification noise (default {d['seed']})",
    )
    p.add_argument(
        "--limit",
        type=int,
        help=f"certify only the first N test images (default all; {e['limit']} with --denoised)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")
    p.set_defaults(handler=_run_experiment)


def _seed(args) -> dict[str, int]:
    """``{"seed": S}``: --seed, else the seed of the run in --checkpoint-dir (so re-running the same
    command resumes it), else nothing (the config draws one and records it)."""
    if args.seed is not None:
        return {"seed": args.seed}
    if args.checkpoint_dir:
        from smoothcert.worker.training.checkpoints import saved_identity

        saved = saved_identity(args.checkpoint_dir)
        if saved and isinstance(saved.get("seed"), int):
            return {"seed": saved["seed"]}
    return {}


def _run_train(args) -> int:
    if args.url:
        return remote.run_training(args, "train")
    _local_only(args)
    from smoothcert.worker.data.datasets import load_dataset
    from smoothcert.worker.training.trainer import train

    given = {
        "arch": args.arch,
        "method": args.method,
        "sigma": args.sigma,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "m": args.m,
        "epsilon": args.epsilon,
        "steps": args.steps,
        "warmup_epochs": args.warmup_epochs,
    }
    given.update(_seed(args))
    config = TrainConfig(**given)
    data = load_dataset(args.dataset)
    noise = "" if config.method == "standard" else f"-sigma{config.sigma:g}"
    out = Path(
        args.out or f"{Path(data.name).stem}-{config.arch}-{config.method}{noise}.safetensors"
    )
    with stderr_bar(config.epochs, "epoch") as bar:

        def progress(metrics) -> None:
            bar.set_postfix(loss=f"{metrics.loss:.3f}", noisy_acc=f"{metrics.noisy_accuracy:.3f}")
            bar.update(metrics.epoch - bar.n)

        result = train(
            config,
            data,
            progress=progress,
            checkpoint_dir=args.checkpoint_dir,
            device=args.device,
            name=args.name,
        )
    result.save(out)
    m = result.metrics
    test = (
        ""
        if m["test_clean_accuracy"] is None
        else (
            f", test accuracy {m['test_clean_accuracy']:.3f} clean / {m['test_noisy_accuracy']:.3f} under noise"
        )
    )
    resumed = f" (resumed after epoch {result.resumed_from})" if result.resumed_from else ""
    trained = "without noise" if config.method == "standard" else f"at σ={config.sigma:g}"
    print(
        f"trained {config.arch} on {data.name} with {config.method} {trained}, seed {config.seed}"
        f"{resumed}: loss {m['train_loss']:.3f}, noisy training accuracy {m['train_noisy_accuracy']:.3f}{test}",
        file=sys.stderr,
    )
    print(out)
    return 0


def _local_only(args) -> None:
    """Refuse the flags that only go with --url when the command trains in this process."""
    if args.wait or args.api_key or args.timeout is not None:
        raise CliArgumentError(
            "--wait, --api-key and --timeout go with --url (train on the service)"
        )


def _run_train_denoiser(args) -> int:
    if args.url:
        return remote.run_training(args, "train-denoiser")
    _local_only(args)
    from smoothcert.service.cli.main import load_classifier_arg, load_denoiser_arg
    from smoothcert.worker.data.datasets import load_dataset
    from smoothcert.worker.training.denoiser import checkpointed_seed, train_denoiser

    if args.init and args.mse_epochs:
        raise CliArgumentError(
            "--mse-epochs trains the mse denoiser that stability starts from; with --init it "
            "starts from that one instead"
        )
    given = {
        "objective": args.objective,
        "sigma": args.sigma,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "depth": args.depth,
        "width": args.width,
        "mse_epochs": 0 if args.init else args.mse_epochs,
    }
    if args.seed is not None:
        given["seed"] = args.seed
    elif args.checkpoint_dir:  # the same command resumes the run it left there, in either stage
        seed = checkpointed_seed(args.checkpoint_dir)
        if seed is not None:
            given["seed"] = seed
    config = DenoiserConfig(**given)
    if config.needs_classifier and not args.classifier:
        raise CliArgumentError(STABILITY_NEEDS_CLASSIFIER)
    classifier = None if not args.classifier else load_classifier_arg(args.classifier, args.device)
    init = None if not args.init else load_denoiser_arg(args.init, args.device)
    data = load_dataset(args.dataset)
    out = Path(
        args.out
        or f"{Path(data.name).stem}-{config.arch}-{config.objective}-sigma{config.sigma:g}.safetensors"
    )
    with stderr_bar(config.total_epochs, "epoch") as bar:

        def progress(metrics) -> None:
            bar.set_postfix(stage=metrics.stage, loss=f"{metrics.loss:.4f}")
            bar.update(metrics.epoch - bar.n)

        result = train_denoiser(
            config,
            data,
            classifier,
            progress=progress,
            checkpoint_dir=args.checkpoint_dir,
            device=args.device,
            name=args.name,
            init=init,
        )
    result.save(out)
    m = result.metrics
    test = "" if m["test_mse"] is None else f", test MSE {m['test_mse']:.4f}"
    if m["test_denoised_accuracy"] is not None:
        test += (
            f", classifier accuracy on denoised noisy test images {m['test_denoised_accuracy']:.3f}"
        )
    resumed = f" (resumed after epoch {result.resumed_from})" if result.resumed_from else ""
    stages = " then ".join(
        f"{s['objective']} ({s['epochs']} epochs, batch {s['batch_size']}, lr {s['lr']:g})"
        for s in result.info.extra["training"]["stages"]
    )
    print(
        f"trained {config.arch} on {data.name} with {stages} at σ={config.sigma:g}, "
        f"seed {config.seed}{resumed}: loss {m['train_loss']:.4f}{test}",
        file=sys.stderr,
    )
    print(out)
    return 0


def _run_import(args) -> int:
    from smoothcert.worker.training.checkpoint_import import import_checkpoint, parse_normalization

    source = Path(args.checkpoint)
    out = (
        Path(args.out) if args.out else source.with_name(source.name.split(".")[0] + ".safetensors")
    )
    if out.resolve() == source.resolve():
        raise CliArgumentError(f"--out {out} would overwrite the checkpoint")
    imported = import_checkpoint(
        source,
        out,
        normalization=parse_normalization(args.normalization),
        arch=args.arch,
        sigma=args.sigma,
        name=args.name,
        input_shape=_shape(args.input_shape),
    )
    info = imported.info
    norm = (
        "none"
        if info.normalization is None
        else ("mean only" if info.normalization.std is None else "mean and std")
    )
    ignored = f"; ignored {', '.join(imported.ignored_keys)}" if imported.ignored_keys else ""
    print(
        f"imported {info.arch} ({info.num_classes} classes, input {list(info.input_shape)}, normalization "
        f"{norm}, training σ {info.sigma if info.sigma is not None else 'unknown'}){ignored}",
        file=sys.stderr,
    )
    print(out)
    return 0


_SHARED_OPTIONS = ("epochs", "batch_size", "lr", "n0", "n", "alpha", "seed", "limit")
_METHOD_OPTIONS = ("methods", "m", "epsilon", "steps", "warmup_epochs")
_DENOISED_OPTIONS = ("rows", "denoiser_epochs", "diffusion_epochs")


def _given(args, names: tuple[str, ...]) -> dict:
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _run_experiment(args) -> int:
    mixed = _given(args, _METHOD_OPTIONS if args.denoised else _DENOISED_OPTIONS)
    if mixed:
        flags = ", ".join("--" + k.replace("_", "-") for k in mixed)
        raise CliArgumentError(
            f"{flags}: not with --denoised (its rows are chosen by --rows)"
            if args.denoised
            else f"{flags}: only with --denoised"
        )
    if args.denoised:
        return _run_denoised(args, _given(args, _SHARED_OPTIONS + _DENOISED_OPTIONS))
    options = _given(args, _SHARED_OPTIONS + _METHOD_OPTIONS)
    methods = ",".join(_EXPERIMENT["methods"]) if args.methods is None else args.methods
    options["methods"] = tuple(_names(methods, METHODS, "--methods"))
    for flag in ("sigmas", "radii"):
        if getattr(args, flag) is not None:
            options[flag] = tuple(_numbers(getattr(args, flag), f"--{flag}"))
    config = ExperimentConfig(**options)
    with stderr_bar(2 * len(config.methods) * len(config.sigmas), "step") as bar:
        result = run_experiment(
            config, args.out_dir or "var/experiment", device=args.device, step=_stepper(bar)
        )
        bar.update(1)
    print(render_markdown(result))
    print(
        f"table {result.paths['table_md']}, curves {result.paths['plot']}, summary {result.paths['summary']}",
        file=sys.stderr,
    )
    return 0


def _run_denoised(args, options: dict) -> int:
    if "rows" in options:
        options["rows"] = tuple(_names(options["rows"], denoised.ROWS, "--rows"))
    if args.sigmas is not None:
        sigmas = _numbers(args.sigmas, "--sigmas")
        if len(sigmas) != 1:
            raise CliArgumentError(
                f"--sigmas: --denoised compares the rows at one σ, got {args.sigmas!r}"
            )
        options["sigma"] = sigmas[0]
    if args.radii is not None:
        options["radii"] = tuple(_numbers(args.radii, "--radii"))
    config = denoised.DenoisedConfig(**options)
    steps = denoised.plan(config.rows)
    with stderr_bar(len(steps), "step") as bar:
        result = denoised.run_denoised_experiment(
            config,
            args.out_dir or "var/experiment-denoised",
            device=args.device,
            step=_stepper(bar),
        )
        bar.update(1)
    print(denoised.render_markdown(result))
    print(
        f"table {result.paths['table_md']}, curves {result.paths['plot']}, summary {result.paths['summary']}, "
        f"models {Path(result.paths['summary']).parent / 'models'} ({result.elapsed_s:.0f} s)",
        file=sys.stderr,
    )
    return 0


def _stepper(bar):
    """A step callback for the experiments: the previous step is done, the next one's name shows."""
    started = [0]

    def step(description: str) -> None:
        bar.update(1 if started[0] else 0)
        started[0] += 1
        bar.set_description(description)

    return step


def _names(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    wrong = [n for n in names if n not in allowed]
    if wrong or not names:
        raise CliArgumentError(
            f"{flag}: {', '.join(wrong) or 'nothing given'}; choose from {', '.join(allowed)}"
        )
    return names


def _numbers(text: str, flag: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CliArgumentError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not v >= 0 for v in values):
        raise CliArgumentError(f"{flag} must be comma-separated numbers >= 0, got {text!r}")
    return values


def _shape(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise CliArgumentError(f"--input-shape must look like 3,32,32, got {text!r}")
    return shape


def _add_train_diffusion(commands) -> None:
    p = commands.add_parser(
        "train-diffusion",
        help="train a small diffusion model for one-step diffusion denoising",
        description="Train an ε-prediction diffusion model (DDPM loss, linear β schedule) on a "
        "dataset's images; `smoothcert certify CLASSIFIER --denoiser FILE` then "
        "denoises each noisy copy in one step at the timestep that matches σ. "
        "Writes one self-describing safetensors file (the schedule in its metadata).",
    )
    d = _DIFFUSION
    _add_image_dataset(p)
    p.add_argument(
        "--out",
        metavar="DIFFUSION.safetensors",
        help="where to write it (default DATASET-diffusion-T<timesteps>.safetensors)",
    )
    p.add_argument(
        "--onnx",
        metavar="FILE.onnx",
        help="also write the ONNX form (inputs x_t float32 (B,C,H,W) and t int64 (B,), the schedule in "
        "its metadata_props)",
    )
    _add_schedule(p, d)
    p.add_argument(
        "--timesteps",
        type=int,
        default=d["timesteps"],
        help="T, the schedule's steps (default %(default)s, which reaches σ ≈ 2.2). T only has to reach "
        "the largest σ you certify: one step is taken at the timestep nearest σ, and with the same "
        "β range a short T reaches large noise in fewer, coarser steps",
    )
    p.add_argument(
        "--beta-start", type=float, default=d["beta_start"], help="first β (default %(default)s)"
    )
    p.add_argument(
        "--beta-end", type=float, default=d["beta_end"], help="last β (default %(default)s)"
    )
    p.add_argument(
        "--width",
        type=int,
        default=d["width"],
        help="diffusion_unet channels (default %(default)s)",
    )
    _add_run(p)
    p.add_argument("--name", help="the model's name in its metadata")
    p.set_defaults(handler=_run_train_diffusion)


def _run_train_diffusion(args) -> int:
    from smoothcert.worker.data.datasets import load_dataset
    from smoothcert.worker.training.diffusion import train_diffusion

    given = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "timesteps": args.timesteps,
        "beta_start": args.beta_start,
        "beta_end": args.beta_end,
        "width": args.width,
        "name": args.name,
    }
    given.update(_seed(args))
    config = DiffusionConfig(**given)
    data = load_dataset(args.dataset)
    out = Path(args.out or f"{Path(data.name).stem}-diffusion-T{config.timesteps}.safetensors")
    with stderr_bar(config.epochs, "epoch") as bar:

        def progress(metrics) -> None:
            bar.set_postfix(loss=f"{metrics.loss:.4f}")
            bar.update(metrics.epoch - bar.n)

        result = train_diffusion(
            config,
            data,
            out,
            checkpoint_dir=args.checkpoint_dir and Path(args.checkpoint_dir),
            device=args.device,
            progress=progress,
        )
    if args.onnx:
        from smoothcert.models.denoisers import load_denoiser
        from smoothcert.models.diffusion import export_diffusion_onnx

        export_diffusion_onnx(load_denoiser(result.path, device="cpu"), Path(args.onnx))
    m = result.metrics
    test = (
        ""
        if not m["test_mse"]
        else ", one-step test MSE "
        + ", ".join(
            f"{v:.4f} at σ={k} (noisy {float(k) ** 2:.4f})" for k, v in m["test_mse"].items()
        )
    )
    resumed = f" (resumed after epoch {result.resumed_from})" if result.resumed_from else ""
    print(
        f"trained diffusion_unet on {data.name} with T={config.timesteps}, seed {config.seed}{resumed}: "
        f"loss {m['train_loss']:.4f}{test}, {m['elapsed_s']:.0f} s",
        file=sys.stderr,
    )
    print(out)
    if args.onnx:
        print(args.onnx)
    return 0
