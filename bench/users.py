"""What users get, per model, in one run on this device: ``make bench``.

    python -m bench.users [--models digits_cnn,cifar_resnet20,imagenet_resnet50] [--device cpu]
                          [--no-service] [--json out.json]

For each model (the trained digits demo; ResNet-20 and a 224x224 ResNet-50 with random weights of
seed 0, which do not change the speed), in noisy samples per second:

- raw: plain batched forward passes of each runtime (torch, torch channels-last, onnxruntime on
  the ONNX export), at the batch size certification uses, on a ready batch; the fastest of them
  is then timed again for as many samples as each path below certifies, just before and just
  after it, and the path's "x fastest raw" is its rate over the mean of those two (the machine is
  shared: a path is compared with raw runs of its own minutes, not with the best short burst);
- cli safetensors / cli onnx: ``smoothcert certify`` as a new process on the model as uploaded
  (certification time from its provenance; loading and the runtime choice are not in it);
- service: a dataset job of the same inputs through a private stack (Redis, the API, one worker
  of concurrency 1, started as ``smoothcert up`` starts them) on the safetensors model;
- peer loop (ResNet-20): one input at a time, batches of 400, fp32 torch, in a process with
  default settings: what a plain reimplementation of Cohen et al.'s loop gets;
- pipeline (with digits_cnn): a DnCNN denoiser of the default size with random weights of seed 0
  in front of the digits model; raw is the fastest denoiser forward followed by the fastest
  classifier forward on a ready batch, the CLI ``smoothcert certify CLASSIFIER --denoiser DENOISER``.

Every process runs as users run it: this one and the CLI tune themselves
(:func:`smoothcert.models.process_tuning.tune_process`), the worker too; the benchmark sets nothing
else and prints the settings and the load average with the figures. Ratios: each path over raw (and
the spread: over the raw run before it and the one after it), and the CLI over the peer loop,
with the issue's targets (certify >= 0.9x raw; digits safetensors within 10% of ONNX; ResNet-20
CLI >= 2.5x the peer loop; a pipeline >= 0.9x its two networks' raw forward).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.options import add_models, check_models

# (number of inputs, n) per model: enough samples for a steady rate, few enough to stay short.
PLAN = {"digits_cnn": (20, 10_000), "cifar_resnet20": (4, 10_000), "imagenet_resnet50": (1, 300)}
N0 = 100
SIGMA = 0.25
PEER_BATCH = 400
RAW_ROUND_S = 2.0
KEY = "bench-key-0123456789abcdef"

PEER_LOOP = r"""
import json, sys, time
import numpy as np, torch
from safetensors.torch import load_file
from smoothcert.models.architectures import build_network
from smoothcert.models.base import Normalize
from smoothcert.models.metadata import Normalization
arch, weights, inputs, n0, n, sigma, batch = sys.argv[1:8]
n0, n, sigma, batch = int(n0), int(n), float(sigma), int(batch)
x = torch.from_numpy(np.load(inputs))
net = build_network(arch, 1000 if arch == "imagenet_resnet50" else 10)
net.load_state_dict(load_file(weights))
channels = x.shape[1]
norm = Normalization(mean=(0.5,) * channels, std=(0.25,) * channels)
model = torch.nn.Sequential(Normalize(norm, channels), net).eval()
def counts(image, num):
    votes = torch.zeros(1000, dtype=torch.long)
    remaining = num
    with torch.no_grad():
        while remaining > 0:
            size = min(batch, remaining)
            noisy = image.repeat(size, 1, 1, 1) + torch.randn(size, *image.shape) * sigma
            votes += torch.bincount(model(noisy).argmax(1), minlength=1000)
            remaining -= size
    return votes
counts(x[0], batch)   # warm-up
started = time.perf_counter()
for image in x:
    counts(image, n0)
    counts(image, n)
print(json.dumps({"samples_per_s": len(x) * (n0 + n) / (time.perf_counter() - started)}))
"""


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    load_at_start = os.getloadavg()
    from smoothcert.models import process_tuning

    # as `smoothcert certify` does at start-up, before torch is imported
    process_tuning.tune_process()
    process_tuning.apply_threads()
    import torch

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="smoothcert-bench-") as tmp:
        root = Path(tmp)
        files = {arch: _model_files(arch, root / arch) for arch in args.models}
        fastest: dict[str, Raw] = {}
        for arch in args.models:
            model_rows, fastest[arch] = _bench_model(arch, files[arch], root, args)
            rows += model_rows
        if "digits_cnn" in args.models and args.pipeline:
            rows += _pipeline_rows(files["digits_cnn"], fastest["digits_cnn"], root, args)
        if args.service:
            for row in _service_rows(files, fastest, root, args):
                rows.append(row)
                _print_row(row)
    _ratios(rows)
    settings = {
        "tuning": process_tuning.applied(),
        "torch_threads": torch.get_num_threads(),
        "cores": process_tuning.cores(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "device": args.device,
        "load_average (1/5/15 min, start; end)": " / ".join(
            "/".join(f"{v:.1f}" for v in load) for load in (load_at_start, os.getloadavg())
        ),
    }
    print()
    _print_table(rows)
    print("settings: " + "; ".join(f"{k}={v}" for k, v in settings.items()))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n"
        )
    return 0


def _model_files(arch: str, folder: Path) -> dict[str, Path]:
    """The model as a self-describing safetensors file and as ONNX (normalization inside), and its
    inputs (the digits test split, or uniform images of seed 0) with labels."""
    import numpy as np
    import torch

    from smoothcert.models.architectures import (
        DEFAULT_INPUT_SHAPE,
        DEFAULT_NUM_CLASSES,
        build_network,
    )
    from smoothcert.models.base import Normalize
    from smoothcert.models.demo import build_demo, export_onnx
    from smoothcert.models.metadata import ModelInfo, Normalization, info_to_json
    from smoothcert.models.safetensors_io import save_safetensors_model

    folder.mkdir(parents=True)
    count = PLAN[arch][0]
    if arch == "digits_cnn":
        demo = build_demo(folder, seed=0)
        x, y = np.load(demo["test_x"])[:count], np.load(demo["test_y"])[:count]
        paths = {"safetensors": demo["safetensors"], "onnx": demo["onnx"]}
    else:
        torch.manual_seed(0)
        shape, classes = DEFAULT_INPUT_SHAPE[arch], DEFAULT_NUM_CLASSES[arch]
        norm = Normalization(mean=(0.5,) * shape[0], std=(0.25,) * shape[0])
        net = build_network(arch, classes).eval()
        info = ModelInfo(
            format="safetensors",
            input_shape=shape,
            num_classes=classes,
            arch=arch,
            normalization=norm,
            name=f"bench-{arch}",
        )
        paths = {
            "safetensors": save_safetensors_model(folder / f"{arch}.safetensors", net, info),
            "onnx": folder / f"{arch}.onnx",
        }
        export_onnx(
            torch.nn.Sequential(Normalize(norm, shape[0]), net).eval(),
            paths["onnx"],
            info_to_json(info),
            input_shape=shape,
        )
        rng = np.random.default_rng(0)
        x = rng.random((count, *shape), dtype=np.float32)
        y = rng.integers(0, classes, count)
    np.save(folder / "x.npy", x)
    np.savez(folder / "data.npz", x=x, y=y)
    return {**paths, "x": folder / "x.npy", "npz": folder / "data.npz"}


class Raw:
    """The raw forwards of a model's runtimes (or of a pipeline's combinations), ready to be timed again."""

    def __init__(self, forwards: dict, x, device):
        self.forwards, self.x, self.device = forwards, x, device

    def rates(self, samples: int) -> dict[str, float]:
        """Samples/s of each forward on the ready batch, about ``samples`` samples in all: one batch
        of each in turn, so that a busy moment of the machine hits all of them."""
        import torch

        rounds = max(1, -(-int(samples) // (len(self.x) * len(self.forwards))))
        spent = dict.fromkeys(self.forwards, 0.0)
        for _ in range(rounds):
            for name, forward in self.forwards.items():
                started = time.perf_counter()
                forward(self.x)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                spent[name] += time.perf_counter() - started
        return {name: round(rounds * len(self.x) / t, 1) for name, t in spent.items()}


def _bracketed(raw: Raw, samples: int, paths) -> list[dict]:
    """Each path's row (``paths``: callables), with the raw rates of every runtime, timed for about
    ``samples`` samples just before it and just after it (one raw run between two paths serves both)."""
    rows, before = [], raw.rates(samples)
    for path in paths:
        row = path()
        after = raw.rates(samples)
        row["raw_around"] = {name: [before[name], after[name]] for name in before}
        rows.append(row)
        _print_row(row)
        before = after
    return rows


def _bench_model(arch: str, files: dict[str, Path], root: Path, args) -> tuple[list[dict], Raw]:
    count, n = PLAN[arch]
    rows, raw = _raw_rows(arch, files, args.device)
    for row in rows:
        _print_row(row)
    paths = [
        lambda fmt=fmt: _cli_row(arch, fmt, files, root, args.device, count, n)
        for fmt in ("safetensors", "onnx")
    ]
    if arch == "cifar_resnet20" or args.peer_all:
        paths.append(lambda: _peer_row(arch, files, count, n))
    rows += _bracketed(raw, count * (N0 + n), paths)
    return rows, raw


def _raw_rows(arch: str, files: dict[str, Path], device: str) -> tuple[list[dict], Raw]:
    """Plain forward passes of each runtime at certification's batch size: best of 3 interleaved
    rounds of about RAW_ROUND_S each; and the fastest of them."""
    import torch

    from smoothcert.models.loaders import load_model
    from smoothcert.models.runtimes import ChannelsLastClassifier, select_runtime
    from smoothcert.worker.smoothing import default_batch_size

    base = load_model(files["safetensors"], device=device)
    batch = default_batch_size(base.info.input_shape, base.device, base)
    candidates = {"torch": base, "torch-channels-last": ChannelsLastClassifier(base)}
    try:
        candidates["onnxruntime"] = select_runtime(base, "onnxruntime", batch_size=batch)
    except ValueError as exc:
        print(f"{arch}: onnxruntime skipped: {exc}", file=sys.stderr)
    x = torch.rand((batch, *base.info.input_shape), generator=torch.Generator().manual_seed(0)).to(
        base.device
    )
    best = _fastest_of({name: model.logits for name, model in candidates.items()}, x)
    rows = [
        {
            "model": arch,
            "path": f"raw {name}",
            "runtime": name,
            "batch_size": batch,
            "samples_per_s": rate,
        }
        for name, rate in best.items()
    ]
    return rows, Raw({name: model.logits for name, model in candidates.items()}, x, base.device)


def _fastest_of(forwards: dict, x) -> dict[str, float]:
    """Samples/s of each forward on ``x``: best of 3 interleaved rounds of about RAW_ROUND_S each."""
    import torch

    best: dict[str, float] = {}
    slowest = 0.0
    for forward in forwards.values():
        forward(x)  # warm-up, and how long one batch takes: each round is about RAW_ROUND_S
        started = time.perf_counter()
        forward(x)
        slowest = max(slowest, time.perf_counter() - started)
    batches = max(2, min(50, int(RAW_ROUND_S / max(slowest, 1e-6))))
    for _ in range(3):
        for name, forward in forwards.items():
            started = time.perf_counter()
            for _ in range(batches):
                forward(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            best[name] = max(
                best.get(name, 0.0), batches * len(x) / (time.perf_counter() - started)
            )
    return best


def _pipeline_rows(files: dict[str, Path], classifier: Raw, root: Path, args) -> list[dict]:
    """The DnCNN + digits pipeline: each denoiser runtime alone, the fastest denoiser followed by
    the fastest classifier (raw), and the CLI on the two files, bracketed by raw runs."""
    import torch

    from smoothcert.models.architectures import DENOISER_DEFAULTS, build_denoiser
    from smoothcert.models.denoisers import load_denoiser, save_denoiser
    from smoothcert.models.metadata import DenoiserInfo
    from smoothcert.models.reproducible import init_weights
    from smoothcert.models.runtimes import onnx_denoiser

    model = "digits pipeline (dncnn + digits_cnn)"
    count, n = PLAN["digits_cnn"]
    network = build_denoiser("dncnn", 1)
    init_weights(network, torch.Generator().manual_seed(0))
    path = save_denoiser(
        root / "dncnn.safetensors",
        network,
        DenoiserInfo(
            format="safetensors",
            input_shape=(1, 8, 8),
            arch="dncnn",
            name="bench-dncnn",
            extra=dict(DENOISER_DEFAULTS["dncnn"]),
        ),
    )
    torch_denoiser = load_denoiser(path, device=args.device)
    denoisers = {
        "torch": torch_denoiser.denoise,
        "onnxruntime": onnx_denoiser(torch_denoiser, root / "pipeline-cache").denoise,
    }
    x = classifier.x
    best = _fastest_of(denoisers, x)
    rows = [
        {
            "model": model,
            "path": f"denoiser alone, {name}",
            "runtime": name,
            "batch_size": len(x),
            "samples_per_s": rate,
            "part": "denoiser",
        }
        for name, rate in best.items()
    ]
    raw = Raw(
        {
            f"{d} + {c}": (lambda batch, d=d, c=c: classifier.forwards[c](denoisers[d](batch)))
            for d in denoisers
            for c in classifier.forwards
        },
        x,
        classifier.device,
    )
    rows += [
        {
            "model": model,
            "path": f"raw {name}",
            "runtime": name,
            "batch_size": len(x),
            "samples_per_s": rate,
        }
        for name, rate in _fastest_of(raw.forwards, x).items()
    ]
    for row in rows:
        _print_row(row)
    files = {**files, "denoiser": path}
    rows += _bracketed(
        raw,
        count * (N0 + n),
        [
            lambda: {
                **_cli_row(
                    "digits_cnn", "safetensors", files, root, args.device, count, n, denoiser=path
                ),
                "model": model,
            }
        ],
    )
    return rows


def _cli_row(
    arch: str,
    fmt: str,
    files: dict[str, Path],
    root: Path,
    device: str,
    count: int,
    n: int,
    denoiser: Path | None = None,
) -> dict:
    out = root / f"{arch}-{fmt}{'-denoised' if denoiser else ''}.tsv"
    env = {**os.environ, "XDG_CACHE_HOME": str(root / "cli-cache")}  # a fresh cache: as a new user
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "smoothcert.service.cli",
            "certify",
            str(files[fmt]),
            "--inputs",
            str(files["x"]),
            "--sigma",
            str(SIGMA),
            "--n0",
            str(N0),
            "--n",
            str(n),
            "--seed",
            "0",
            "--device",
            device,
            "--out",
            str(out),
            *(["--denoiser", str(denoiser)] if denoiser else []),
        ],
        env=env,
        check=True,
        stderr=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - started
    provenance = json.loads(Path(str(out) + ".json").read_text())
    return {
        "model": arch,
        "path": f"cli {fmt}" + (" --denoiser" if denoiser else ""),
        "runtime": _chosen(provenance["runtime_choice"]),
        "batch_size": provenance["batch_size"],
        "samples_per_s": count * (N0 + n) / provenance["elapsed_s"],
        "process_wall_s": round(wall, 1),
    }


def _peer_row(arch: str, files: dict[str, Path], count: int, n: int) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MALLOC_", "OMP_", "GLIBC_TUNABLES"))
    }
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PEER_LOOP,
            arch,
            str(files["safetensors"]),
            str(files["x"]),
            str(N0),
            str(n),
            str(SIGMA),
            str(PEER_BATCH),
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    rate = json.loads(result.stdout.strip().splitlines()[-1])["samples_per_s"]
    return {
        "model": arch,
        "path": "peer loop (torch, default settings)",
        "runtime": "torch",
        "batch_size": PEER_BATCH,
        "samples_per_s": rate,
    }


def _service_rows(
    files: dict[str, dict[str, Path]], fastest: dict[str, Raw], root: Path, args
) -> list[dict]:
    """A dataset job per model on a private stack with one worker; the chunks' own certification
    time, bracketed by raw runs of the fastest forward as the CLI rows are."""
    import httpx

    from bench.dataset_job import _start_workers, _stop, _stop_all, _wait, bench_env, start_api
    from smoothcert.service.core.jobs import TERMINAL
    from smoothcert.service.devstack.redis_server import RedisServer

    rows = []
    with RedisServer(root / "redis", persist=False) as server:
        env = bench_env(
            server.url,
            root,
            SMOOTHCERT_DEVICE=args.device,
            SMOOTHCERT_MODEL_CHECK_DEADLINE_S="600",
            SMOOTHCERT_MODEL_CHECK_TIMEOUT_S="900",
        )
        api, port = start_api(env, root)
        workers = _start_workers(1, env, root, server.url, "bench")
        try:
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                timeout=900,
                headers={"Authorization": f"Bearer {KEY}"},
            ) as client:
                _wait(lambda: client.get("/healthz").status_code == 200, "the API", [api])
                for arch, paths in files.items():
                    count, n = PLAN[arch]
                    before = fastest[arch].rates(count * (N0 + n))
                    with open(paths["safetensors"], "rb") as f:
                        model = client.post(
                            "/v1/models", files={"file": (paths["safetensors"].name, f)}
                        )
                    with open(paths["npz"], "rb") as f:
                        dataset = client.post("/v1/datasets", files={"file": ("data.npz", f)})
                    body = {
                        "model_id": model.raise_for_status().json()["id"],
                        "sigma": SIGMA,
                        "n0": N0,
                        "n": n,
                        "dataset_id": dataset.raise_for_status().json()["id"],
                        "seed": 0,
                    }
                    job_id = (
                        client.post("/v1/certify", json=body).raise_for_status().json()["job_id"]
                    )
                    while (job := client.get(f"/v1/jobs/{job_id}").json())[
                        "status"
                    ] not in TERMINAL:
                        time.sleep(0.2)
                    if job["status"] != "succeeded":
                        raise SystemExit(f"the {arch} dataset job {job['status']}: {job['error']}")
                    after = fastest[arch].rates(count * (N0 + n))
                    provenance = job["result"]["provenance"]
                    # The chunks' own certification time: the first job of a model also chose its runtime.
                    certifying = sum(c["elapsed_s"] for c in provenance["chunks"])
                    rows.append(
                        {
                            "model": arch,
                            "path": "service dataset job (safetensors)",
                            "runtime": _chosen(provenance["runtime_choice"]),
                            "batch_size": provenance["batch_size"],
                            "samples_per_s": count * (N0 + n) / certifying,
                            "job_elapsed_s": round(job["result"]["totals"]["elapsed_s"], 1),
                            "raw_around": {k: [v, after[k]] for k, v in before.items()},
                        }
                    )
        finally:
            _stop_all(workers)
            _stop(api.proc)
    return rows


def _chosen(choice: dict) -> str:
    """The runtime a provenance's ``runtime_choice`` names; a pipeline's as "<denoiser's> + <classifier's>"."""
    parts = choice.get("parts")
    return (
        choice["chosen"]
        if not parts
        else f"{parts['denoiser']['chosen']} + {parts['classifier']['chosen']}"
    )


def _ratios(rows: list[dict]) -> None:
    for arch in {r["model"] for r in rows}:
        mine = [r for r in rows if r["model"] == arch]
        raw = max((r["samples_per_s"] for r in mine if r["path"].startswith("raw")), default=None)
        peer = next((r["samples_per_s"] for r in mine if r["path"].startswith("peer")), None)
        onnx = next((r["samples_per_s"] for r in mine if r["path"] == "cli onnx"), None)
        for r in mine:
            r["vs_fastest_raw"] = None if raw is None or r.get("part") else r["samples_per_s"] / raw
            if r.get(
                "raw_around"
            ):  # against the raw runs of its own minutes: the fastest runtime's, its own
                means = {k: (before + after) / 2 for k, (before, after) in r["raw_around"].items()}
                best = max(means, key=lambda k: means[k])
                r["vs_fastest_raw"] = r["samples_per_s"] / means[best]
                r["vs_raw_spread"] = tuple(
                    r["samples_per_s"] / v for v in sorted(r["raw_around"][best], reverse=True)
                )
                own = r["raw_around"].get(r["runtime"])
                r["vs_own_raw"] = None if own is None else 2 * r["samples_per_s"] / sum(own)
            if peer is not None:
                r["vs_peer_loop"] = r["samples_per_s"] / peer
            if onnx is not None and r["path"] == "cli safetensors":
                r["vs_cli_onnx"] = r["samples_per_s"] / onnx


def _print_row(row: dict) -> None:
    print(
        f"{row['model']:<18} {row['path']:<36} {row['runtime']:<20} batch {row['batch_size']:>6}  "
        f"{row['samples_per_s']:>10,.0f} samples/s",
        flush=True,
    )


def _print_table(rows: list[dict]) -> None:
    print(
        "| model | path | runtime | batch | samples/s | x fastest raw | (before / after) | x own runtime raw "
        "| x peer loop | x CLI ONNX |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        spread = r.get("vs_raw_spread")
        cells = [
            r["model"],
            r["path"],
            r["runtime"],
            str(r["batch_size"]),
            f"{r['samples_per_s']:,.0f}",
            _ratio(r.get("vs_fastest_raw")),
            "" if spread is None else f"{spread[0]:.2f}-{spread[1]:.2f}",
            _ratio(r.get("vs_own_raw")),
            _ratio(r.get("vs_peer_loop")),
            _ratio(r.get("vs_cli_onnx")),
        ]
        print("| " + " | ".join(cells) + " |")


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.users", description=__doc__.split("\n\n")[0])
    add_models(p, PLAN)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--no-service", dest="service", action="store_false", help="skip the dataset jobs"
    )
    p.add_argument(
        "--no-pipeline",
        dest="pipeline",
        action="store_false",
        help="skip the denoiser + digits pipeline rows",
    )
    p.add_argument(
        "--peer-all", action="store_true", help="the peer loop for every model, not only ResNet-20"
    )
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    check_models(p, args, PLAN)
    return args


if __name__ == "__main__":
    sys.exit(main())
