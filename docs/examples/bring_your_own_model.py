"""Bring your own model, end to end on a CPU in a few seconds (docs/bring-your-own-model.md):

1. train a small PyTorch classifier on normalized inputs, with Gaussian noise (as a model that is
   to be smoothed should be trained);
2. export it to ONNX with torch's default exporter (it needs ``onnxscript``, which the project's
   ``engine`` extra installs);
3. certify held-out digits with the library API, once with the normalization the model was trained
   with and once without it, to show what leaving it out does.

Run: ``.venv/bin/python docs/examples/bring_your_own_model.py [OUT_DIR]``. ``tests/test_guide.py``
runs it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from smoothcert.models.loaders import load_model
from smoothcert.worker.smoothing import RunOptions, certify

SIGMA = 0.25


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as float32 (N, 1, 8, 8) in [0, 1]: a training and a test split."""
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:100], order[100:]
    return x[train], y[train], x[test], y[test]


def train(x: np.ndarray, y: np.ndarray, mean: float, std: float) -> torch.nn.Module:
    """A small MLP trained on (x + noise - mean) / std: normalization inside the training loop, not
    inside the model, as most training code does it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(40):
        for batch in torch.randperm(len(xs)).split(128):
            noisy = xs[batch] + SIGMA * torch.randn_like(xs[batch])
            loss = torch.nn.functional.cross_entropy(model((noisy - mean) / std), ys[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def export(model: torch.nn.Module, path: Path) -> Path:
    """The model as ONNX: input ``x`` (batch, 1, 8, 8), output the class scores, batch dynamic."""
    example = torch.zeros(2, 1, 8, 8)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,  # one self-contained file: smoothcert accepts no external weights
    )
    return path


def certified_accuracy(path: Path, x, y, normalization, radius: float = 0.25) -> float:
    """The share of ``x`` certified right at ``radius`` or beyond, with the library API."""
    model = load_model(path, device="cpu", normalization=normalization)
    run = certify(model, x, SIGMA, n0=100, n=1000, alpha=0.001, options=RunOptions(seed=0))
    return float(
        np.mean([r.prediction == label and r.radius >= radius for r, label in zip(run.results, y)])
    )


def main(out_dir: str | Path) -> dict[str, float]:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = digits()
    mean, std = float(x_train.mean()), float(x_train.std())
    path = export(train(x_train, y_train, mean, std), Path(out_dir) / "digits_mlp.onnx")
    given = {"mean": [mean], "std": [std]}
    with_norm = certified_accuracy(path, x_test, y_test, given)
    without = certified_accuracy(path, x_test, y_test, None)
    print(f"normalization: {given}")
    print(f"certified accuracy at r = 0.25 with it: {with_norm:.2f}, without it: {without:.2f}")
    return {"with_normalization": with_norm, "without": without, "mean": mean, "std": std}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
