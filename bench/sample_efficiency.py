"""Samples per input of the anytime-valid test at a target radius, against fixed n, same alpha.

    python -m bench.sample_efficiency [--radius 0.25] [--sigma 0.25] [--n 100000] [--limit N]

Two workloads:
- synthetic: 20,000 inputs whose p_A follows a mixture like a trained model's (most near 1,
  some spread over (½, 1), some below ½), votes drawn from a binomial: no model involved;
- digits: the demo model (digits_cnn, trained at σ = 0.25) on the digits test split, through
  the real engine, once with fixed n (``certify``) and once with the anytime-valid test at the
  target radius (``certify_at_radius``).
For both it prints the mean samples per input (n0 included) of each protocol, their ratio, and
the certified accuracy at r of each (for the synthetic set, "accuracy" is the certified share).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

from smoothcert.service.core.params import DEFAULT_ALPHA, DEFAULT_N, DEFAULT_N0


def synthetic(
    radius: float, sigma: float, n: int, n0: int, alpha: float, count: int, seed: int
) -> dict:
    from smoothcert.worker.smoothing import bounds
    from smoothcert.worker.smoothing.sequential import MIN_CHUNK, SequentialTest, p0_for

    rng = np.random.default_rng(seed)
    kind = rng.random(count)
    p_a = np.where(
        kind < 0.6,
        1 - rng.beta(0.5, 200, count),  # confident inputs
        np.where(
            kind < 0.9,
            rng.uniform(0.5, 1.0, count),  # in between
            rng.uniform(0.2, 0.5, count),
        ),
    )  # hopeless
    n_a = rng.binomial(n, p_a)
    _, radius_fixed, _ = bounds.cohen_radius(n_a, n, alpha, sigma)
    fixed_certified = radius_fixed >= radius

    test = SequentialTest(p0_for(radius, sigma), alpha, alpha, n)
    used, k = np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int64)
    verdict = np.zeros(count, dtype=np.int64)
    while (active := np.flatnonzero(verdict == 0)).size:
        step = np.minimum(np.maximum(used[active], MIN_CHUNK), n - used[active])
        k[active] += rng.binomial(step, p_a[active])
        used[active] += step
        verdict[active] = test.decide(used[active], k[active])
    return _row(
        "synthetic p_A",
        count,
        n0 + n,
        n0 + used.mean(),
        fixed_certified.mean(),
        (verdict == 1).mean(),
    )


def digits(
    radius: float, sigma: float, n: int, n0: int, alpha: float, limit: int | None, seed: int
) -> dict:
    from smoothcert.models.demo import build_demo
    from smoothcert.models.loaders import load_model
    from smoothcert.worker.smoothing import RunOptions, certify, certify_at_radius

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_demo(tmp, seed=0)
        model = load_model(paths["onnx"], device="auto")
        x, y = np.load(paths["test_x"])[:limit], np.load(paths["test_y"])[:limit]
    started = time.perf_counter()
    options = RunOptions(seed=seed)
    fixed = certify(model, x, sigma=sigma, n0=n0, n=n, alpha=alpha, options=options).results
    fixed_s = time.perf_counter() - started
    started = time.perf_counter()
    seq = certify_at_radius(
        model, x, sigma, radius, n0=n0, n_max=n, alpha=alpha, options=options
    ).results
    seq_s = time.perf_counter() - started
    fixed_acc = np.mean([r.prediction == t and r.radius >= radius for r, t in zip(fixed, y)])
    seq_acc = np.mean([d.certified_at_r and d.prediction == t for d, t in zip(seq, y)])
    row = _row(
        "digits test set",
        len(x),
        n0 + n,
        np.mean([d.samples_used for d in seq]),
        fixed_acc,
        seq_acc,
    )
    row.update(fixed_seconds=fixed_s, sequential_seconds=seq_s)
    return row


def _row(name, count, fixed_samples, seq_samples, fixed_acc, seq_acc) -> dict:
    row = {
        "workload": name,
        "inputs": count,
        "fixed_samples_per_input": float(fixed_samples),
        "sequential_samples_per_input": float(seq_samples),
        "ratio": float(fixed_samples / seq_samples),
        "fixed_certified_accuracy": float(fixed_acc),
        "sequential_certified_accuracy": float(seq_acc),
    }
    print(
        f"{name:<16} {count:>6} inputs  fixed {fixed_samples:>9,.0f}/input  sequential {seq_samples:>9,.0f}/input"
        f"  {row['ratio']:6.1f}x fewer  certified accuracy at r: fixed {100 * fixed_acc:.1f}%"
        f"  sequential {100 * seq_acc:.1f}%",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.sample_efficiency", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--radius", type=float, default=0.25)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--n", type=int, default=DEFAULT_N)
    p.add_argument("--n0", type=int, default=DEFAULT_N0)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    p.add_argument("--limit", type=int, help="certify only the first N test digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-digits", action="store_true", help="only the synthetic workload")
    args = p.parse_args(argv)
    print(
        f"r = {args.radius}, sigma = {args.sigma}, alpha = {args.alpha}, n0 = {args.n0}, fixed n = {args.n}"
    )
    synthetic(args.radius, args.sigma, args.n, args.n0, args.alpha, 20_000, args.seed)
    if not args.skip_digits:
        digits(args.radius, args.sigma, args.n, args.n0, args.alpha, args.limit, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
