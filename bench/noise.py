"""Discrete noise against Gaussian noise: speed, and certified accuracy on the digits test split.

    python -m bench.noise speed  [--archs digits_cnn,cifar_resnet20] [--n 20000] [--repeats 3]
    python -m bench.noise digits [--sigmas 0.25,0.5] [--n 10000] [--seed 0]
                                 [--radii 0,0.25,0.5,0.75,1]
    (either with --json out.json)

speed: certify of one grid input (n0 + n noisy copies) in each mode, interleaved, best of
``--repeats``, in samples/s, and discrete over Gaussian; then the noise alone (a batch of noise
added to inputs, no model) in each mode. A ratio of 1 means discrete noise costs nothing extra.

digits: the demo model (``smoothcert.models.demo``, trained here with seed 0) on the digits test
split rounded onto the 8-bit grid (the split is k/16, off the grid), certified in both modes with
the same seed, n0, n and α; certified accuracy at each radius, and the difference in points.

The process runs under the settings the CLI and the worker give themselves (as bench.throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

MODES = ("gaussian", "discrete")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from smoothcert.models import process_tuning

    process_tuning.tune_process()
    process_tuning.apply_threads()
    import torch

    report = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if args.command == "speed":
        report["rows"] = speed(args)
    else:
        report["digits"] = digits(args)
    print(f"{report['cores']} cores, torch {report['torch']} ({report['torch_threads']} threads)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def speed(args) -> list[dict]:
    import numpy as np

    from bench.throughput import _build
    from smoothcert.worker.smoothing import RunOptions, certify, default_batch_size

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            model = _build(arch, "torch", Path(tmp), args.device)
            shape = model.info.input_shape
            batch = args.batch_size or default_batch_size(shape, model.device)
            x = np.full(shape, 128 / 255, dtype=np.float32)
            samples = args.n0 + args.n
            best = dict.fromkeys(MODES, 0.0)
            for rep in range(args.repeats + 1):  # the first round warms up and is not counted
                for noise in MODES:
                    options = RunOptions(batch_size=batch, seed=rep)
                    started = time.perf_counter()
                    certify(model, x, 0.25, args.n0, args.n, options=options, noise=noise)
                    rate = samples / (time.perf_counter() - started)
                    if rep:
                        best[noise] = max(best[noise], rate)
            noise_only = _noise_only(model, batch, args.repeats)
            rows.append(
                {
                    "arch": arch,
                    "device": str(model.device),
                    "batch_size": batch,
                    "n0": args.n0,
                    "n": args.n,
                    "gaussian_samples_per_s": best["gaussian"],
                    "discrete_samples_per_s": best["discrete"],
                    "ratio": best["discrete"] / best["gaussian"],
                    **noise_only,
                }
            )
            r = rows[-1]
            print(
                f"{arch:<16} batch {batch:>5}  gaussian {r['gaussian_samples_per_s']:>9,.0f}/s  "
                f"discrete {r['discrete_samples_per_s']:>9,.0f}/s  ratio {r['ratio']:.3f}  "
                f"(noise alone: ratio {r['noise_only_ratio']:.3f})",
                flush=True,
            )
    return rows


def _noise_only(model, batch: int, repeats: int) -> dict:
    """Copies per second of the noise alone, drawn and added as the sampler does, in each mode."""
    import numpy as np
    import torch

    from smoothcert.worker.smoothing.options import RunOptions
    from smoothcert.worker.smoothing.sampling import Sampler

    x = np.full((4, *model.info.input_shape), 128 / 255, dtype=np.float32)
    rates = {}
    for noise in MODES:
        sampler = Sampler(model, x, 0.25, RunOptions(batch_size=batch, seed=0), noise=noise)
        owner = torch.arange(batch, device=sampler.x.device) % 4
        out = torch.empty((batch, *sampler.x.shape[1:]), device=sampler.x.device)
        best = 0.0
        for rep in range(repeats + 1):
            started = time.perf_counter()
            for _ in range(10):
                if sampler.grid is not None:
                    sampler.grid.noisy(
                        sampler.levels.index_select(0, owner), sampler.generator, out
                    )
                else:
                    torch.randn(out.shape, generator=sampler.generator, out=out)
                    out.mul_(0.25).add_(sampler.x.index_select(0, owner))
            if rep:
                best = max(best, 10 * batch / (time.perf_counter() - started))
        rates[noise] = best
    return {
        "noise_only_gaussian_per_s": rates["gaussian"],
        "noise_only_discrete_per_s": rates["discrete"],
        "noise_only_ratio": rates["discrete"] / rates["gaussian"],
    }


def digits(args) -> list[dict]:
    import numpy as np

    from smoothcert.models.demo import build_demo
    from smoothcert.models.loaders import load_model
    from smoothcert.service.core.accuracy import certified_accuracy
    from smoothcert.worker.smoothing import RunOptions, certify

    radii = [float(r) for r in args.radii.split(",")]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_demo(tmp, seed=0)
        model = load_model(paths["safetensors"], device=args.device)
        x = np.load(paths["test_x"])
        y = np.load(paths["test_y"])
        rounded = (np.rint(x * 255) / np.float32(255)).astype(np.float32)
        for sigma in (float(s) for s in args.sigmas.split(",")):
            curves = {}
            for noise in MODES:
                started = time.perf_counter()
                run = certify(
                    model,
                    rounded,
                    sigma,
                    args.n0,
                    args.n,
                    args.alpha,
                    options=RunOptions(seed=args.seed),
                    noise=noise,
                )
                right = [r.prediction == label for r, label in zip(run.results, y)]
                shares = certified_accuracy(right, [r.radius for r in run.results], radii)
                curves[noise] = [100 * float(a) for a in shares]
                print(
                    f"sigma {sigma:g} {noise:<8} "
                    + "  ".join(f"r={r:g}: {a:5.1f}%" for r, a in zip(radii, curves[noise]))
                    + f"  ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
            gap = [d - g for d, g in zip(curves["discrete"], curves["gaussian"])]
            print(
                f"sigma {sigma:g} discrete - gaussian, points: "
                + "  ".join(f"{g:+.2f}" for g in gap)
                + f"  (largest |gap| {max(map(abs, gap)):.2f})",
                flush=True,
            )
            out.append(
                {
                    "sigma": sigma,
                    "n0": args.n0,
                    "n": args.n,
                    "alpha": args.alpha,
                    "seed": args.seed,
                    "inputs": len(y),
                    "radii": radii,
                    "certified_accuracy_percent": curves,
                    "gap_points": gap,
                }
            )
    return out


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.noise", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("speed", "digits"))
    p.add_argument("--archs", default="digits_cnn,cifar_resnet20")
    p.add_argument("--n", type=int)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--sigmas", default="0.25,0.5")
    p.add_argument("--radii", default="0,0.25,0.5,0.75,1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    if args.n is None:
        args.n = 20_000 if args.command == "speed" else 10_000
    return args


if __name__ == "__main__":
    sys.exit(main())
