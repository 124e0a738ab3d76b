"""Certified images per second on a GPU, in every runtime and precision, against the raw forward.

    python -m bench.gpu [--models cifar_resnet110,imagenet_resnet50] [--budget-s 540] [--json out.json]
    python -m bench.gpu --dry-run      # on any machine: the plan, and every network built on the CPU

One short script for a lent GPU (at most 10 minutes): CIFAR ResNet-110 at n = 100,000 and an
ImageNet ResNet-50 (224x224) at n = 10,000, random weights of seed 0 (speed does not depend on
them), one input each, n0 = 100, σ = 0.25, in torch, torch channels-last, compiled torch
(inductor) and onnxruntime (CUDA provider, I/O binding), each in float32, float16 and bfloat16
where the runtime runs it (onnxruntime: float32). Per row: the batch size (from the device's free
memory), the raw forward rate on a ready batch, the certification rate, their ratio, and seconds
per certified image. The process tunes itself as the CLI does and sets nothing else. Rows that
would start after ``--budget-s`` are left out, saying so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.options import add_models, check_models

PLAN = {"cifar_resnet110": 100_000, "imagenet_resnet50": 10_000}
RUNTIMES = ("torch", "torch-channels-last", "torch-compiled", "onnxruntime")
PRECISIONS = ("float32", "float16", "bfloat16")
N0 = 100
SIGMA = 0.25
RAW_BATCHES = 10


def plan(models: list[str]) -> list[tuple[str, str, str]]:
    """(model, runtime, precision) rows in the order they run; onnxruntime in float32 only."""
    return [
        (m, r, p)
        for m in models
        for r in RUNTIMES
        for p in PRECISIONS
        if not (r == "onnxruntime" and p != "float32")
    ]


def build(arch: str, device: str):
    """A TorchClassifier of ``arch`` with random weights of seed 0 on ``device``."""
    import torch

    from smoothcert.models.architectures import (
        DEFAULT_INPUT_SHAPE,
        DEFAULT_NUM_CLASSES,
        build_network,
    )
    from smoothcert.models.base import Normalize, TorchClassifier
    from smoothcert.models.metadata import ModelInfo, Normalization

    torch.manual_seed(0)
    shape, classes = DEFAULT_INPUT_SHAPE[arch], DEFAULT_NUM_CLASSES[arch]
    norm = Normalization(mean=(0.5,) * shape[0], std=(0.25,) * shape[0])
    module = torch.nn.Sequential(Normalize(norm, shape[0]), build_network(arch, classes)).eval()
    info = ModelInfo(
        format="safetensors",
        input_shape=shape,
        num_classes=classes,
        arch=arch,
        sha256=f"bench-gpu-{arch}",
    )
    return TorchClassifier(module, info, device)


def variant(base, runtime: str, precision: str, cache: Path):
    """``base`` in ``runtime`` and ``precision`` (models/runtimes.py's classes)."""
    import torch

    from smoothcert.models import runtimes

    if precision != "float32":
        runtimes.check_precision(base, "torch", precision)
        reduced = runtimes.ReducedPrecisionClassifier(base, precision)
        if runtime == "torch-channels-last":
            reduced.module = reduced.module.to(memory_format=torch.channels_last)
        elif runtime == "torch-compiled":
            compiled = runtimes.CompiledClassifier(reduced)
            compiled.logits = lambda x: compiled._compiled(x.to(reduced._dtype)).float()  # type: ignore[method-assign]
            compiled.precision = precision
            return compiled
        return reduced
    if runtime == "onnxruntime":
        return runtimes.select_runtime(base, "onnxruntime", batch_size=1, cache_dir=cache)
    return runtimes._build(runtime, base, cache)


def measure_row(model, arch: str, runtime: str, precision: str, n: int) -> dict:
    import numpy as np
    import torch

    from smoothcert.worker.smoothing import RunOptions, certify, default_batch_size

    device = model.device
    batch = default_batch_size(model.info.input_shape, device, model)
    ready = torch.rand((batch, *model.info.input_shape), device=device)
    model.logits(ready)  # warm-up (a compiled model compiles here)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(RAW_BATCHES):
        model.logits(ready)
    torch.cuda.synchronize(device)
    raw = RAW_BATCHES * batch / (time.perf_counter() - started)
    x = np.full(model.info.input_shape, 0.5, dtype=np.float32)
    # The warm-up may leave less free than the batch was chosen for: lowered then, and recorded.
    options = RunOptions(batch_size=batch, seed=0, lower_batch_size=True)
    certify(model, x, sigma=SIGMA, n0=N0, n=batch, options=options)  # warm-up of the engine's path
    started = time.perf_counter()
    run = certify(model, x, sigma=SIGMA, n0=N0, n=n, options=replace(options, seed=1))
    seconds = time.perf_counter() - started
    rate = (N0 + n) / seconds
    return {
        "model": arch,
        "runtime": runtime,
        "precision": precision,
        "provider": model.provider,
        "batch_size": batch,
        "certify_batch_size": run.provenance["batch_size"],
        "n": n,
        "raw_samples_per_s": raw,
        "certify_samples_per_s": rate,
        "ratio": rate / raw,
        "seconds_per_image": seconds,
        "images_per_s": 1 / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from smoothcert.models import process_tuning

    process_tuning.tune_process()
    process_tuning.apply_threads()
    import torch

    rows_planned = plan(args.models)
    if args.dry_run:
        for arch in args.models:
            model = build(arch, "cpu")
            params = sum(p.numel() for p in model.module.parameters())
            print(
                f"{arch}: {params:,} parameters, input {list(model.info.input_shape)}, n = {PLAN[arch]:,}"
            )
        for arch, runtime, precision in rows_planned:
            print(f"would run {arch} {runtime} {precision}")
        return 0
    if not torch.cuda.is_available():
        print("bench.gpu needs a CUDA device (try --dry-run)", file=sys.stderr)
        return 2
    import tempfile

    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="smoothcert-gpu-bench-") as tmp:
        bases = {arch: build(arch, "cuda") for arch in args.models}
        for arch, runtime, precision in rows_planned:
            if time.perf_counter() - started > args.budget_s:
                print(
                    f"left out (past --budget-s {args.budget_s:g}): {arch} {runtime} {precision}",
                    flush=True,
                )
                continue
            try:
                model = variant(bases[arch], runtime, precision, Path(tmp))
                row = measure_row(model, arch, runtime, precision, PLAN[arch])
            except (
                Exception
            ) as exc:  # one runtime failing (a compiler, a provider) leaves the others
                print(
                    f"{arch} {runtime} {precision}: failed: {str(exc).splitlines()[0] if str(exc) else exc}",
                    flush=True,
                )
                continue
            rows.append(row)
            print(
                f"{arch:<18} {runtime:<20} {precision:<9} {row['provider']:<22} batch {row['batch_size']:>6} "
                f"raw {row['raw_samples_per_s']:>12,.0f}/s certify {row['certify_samples_per_s']:>12,.0f}/s "
                f"ratio {row['ratio']:.2f}  {row['seconds_per_image']:.3f} s/image",
                flush=True,
            )
    print(
        f"device {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
        f"settings {process_tuning.applied()}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    add_models(p, PLAN)
    p.add_argument(
        "--budget-s", type=float, default=540.0, help="start no row after this many seconds"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and build the networks on the CPU"
    )
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    check_models(p, args, PLAN)
    return args


if __name__ == "__main__":
    sys.exit(main())
