"""Certification throughput over raw forward-pass throughput, same model, same device, one run.

    python -m bench.throughput [--archs digits_cnn,cifar_resnet20] [--runtimes torch,onnxruntime]
                               [--n 10000] [--repeats 3] [--json out.json]

Raw: plain batched inference (``model.logits``) on a ready batch, as many samples as one
certification draws. Certification: ``certify`` on one input (n0 + n noisy samples: noise
generation, the forward passes, counting). The ratio of the two is the engine's efficiency; 1.0
means the smoothing machinery costs nothing beyond the model.

The process runs under the settings the CLI and the worker give themselves
(:func:`smoothcert.models.process_tuning.tune_process`: malloc, OpenMP wait policy, threads) and
nothing else; they are printed with the figures.
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

DEFAULT_ARCHS = ("digits_cnn", "cifar_resnet20")
RUNTIMES = ("torch", "onnxruntime")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from smoothcert.models import process_tuning

    # what `smoothcert certify` does at start-up, before torch is imported
    process_tuning.tune_process()
    process_tuning.apply_threads()
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            for runtime in args.runtimes.split(","):
                model = _build(arch, runtime, Path(tmp), args.device)
                rows.append(
                    measure(model, arch, runtime, args.n, args.n0, args.repeats, args.batch_size)
                )
                _print_row(rows[-1])
    report = {
        "tuning": process_tuning.applied(),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "rows": rows,
    }
    print(
        "settings: "
        + " ".join(f"{k}={v}" for k, v in process_tuning.applied().items())
        + f"; torch threads {report['torch_threads']}; {report['cores']} cores; torch {torch.__version__}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def measure(
    model, arch: str, runtime: str, n: int, n0: int, repeats: int, batch_size: int | None
) -> dict:
    """Best-of-``repeats`` raw and certification throughput (samples/s), interleaved, and their ratio."""
    import numpy as np
    import torch

    from smoothcert.worker.smoothing import RunOptions, certify, default_batch_size

    batch = batch_size or default_batch_size(model.info.input_shape, model.device)
    generator = torch.Generator().manual_seed(0)
    ready = torch.rand((batch, *model.info.input_shape), generator=generator).to(model.device)
    x = np.full(model.info.input_shape, 0.5, dtype=np.float32)
    samples = n0 + n
    batches = -(-samples // batch)
    model.logits(ready)  # warm-up: first-call allocations and kernel selection
    certify(model, x, sigma=0.25, n0=n0, n=batch, options=RunOptions(batch_size=batch, seed=0))
    raw, cert = [], []
    for rep in range(repeats):
        started = time.perf_counter()
        for _ in range(batches):
            model.logits(ready)
        _sync(model.device)
        raw.append(batches * batch / (time.perf_counter() - started))
        started = time.perf_counter()
        certify(model, x, sigma=0.25, n0=n0, n=n, options=RunOptions(batch_size=batch, seed=rep))
        cert.append(samples / (time.perf_counter() - started))
    return {
        "arch": arch,
        "runtime": runtime,
        "provider": model.provider,
        "device": str(model.device),
        "batch_size": batch,
        "n0": n0,
        "n": n,
        "raw_samples_per_s": max(raw),
        "certify_samples_per_s": max(cert),
        "ratio": max(cert) / max(raw),
        "raw_all": raw,
        "certify_all": cert,
    }


def _build(arch: str, runtime: str, tmp: Path, device: str):
    """A randomly initialised network of ``arch`` (throughput does not depend on the weights)."""
    import torch

    from smoothcert.models.architectures import DEFAULT_INPUT_SHAPE, build_network
    from smoothcert.models.base import Normalize, TorchClassifier
    from smoothcert.models.metadata import ModelInfo, Normalization

    torch.manual_seed(0)
    shape = DEFAULT_INPUT_SHAPE[arch]
    num_classes = 10
    norm = Normalization(mean=(0.5,) * shape[0], std=(0.25,) * shape[0])
    module = torch.nn.Sequential(Normalize(norm, shape[0]), build_network(arch, num_classes)).eval()
    info = ModelInfo(format="safetensors", input_shape=shape, num_classes=num_classes, arch=arch)
    if runtime == "torch":
        from smoothcert.models.loaders import resolve_device

        return TorchClassifier(module, info, resolve_device(device))
    from smoothcert.models.demo import export_onnx
    from smoothcert.models.onnx_runtime import OnnxClassifier

    path = tmp / f"{arch}.onnx"
    export_onnx(module, path, "{}", input_shape=shape)
    return OnnxClassifier(path, device=device)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _print_row(row: dict) -> None:
    print(
        f"{row['arch']:<16} {row['runtime']:<12} {row['provider']:<22} batch {row['batch_size']:>5}  "
        f"raw {row['raw_samples_per_s']:>10,.0f}/s  certify {row['certify_samples_per_s']:>10,.0f}/s  "
        f"ratio {row['ratio']:.3f}",
        flush=True,
    )


def _parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--archs", default=",".join(DEFAULT_ARCHS))
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the figures here")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
