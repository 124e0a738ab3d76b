"""A demo model trained in seconds: ``digits_cnn`` on scikit-learn's bundled 8x8 digits.

Trained with Gaussian noise augmentation (sigma = 0.25, added in [0,1] pixel space before the
normalization layer, no clamping) so that it smooths well. Written both as a self-describing
safetensors file and as an ONNX file of the same model (normalization included), with the test
split beside them. Deterministic, byte for byte: every random draw comes from one seeded local
generator and training runs on one thread (torch results depend on the thread count).

    python -m smoothcert.models.demo OUT_DIR
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from smoothcert.models.architectures import DEFAULT_INPUT_SHAPE, build_network
from smoothcert.models.base import Normalize
from smoothcert.models.metadata import METADATA_KEY, ModelInfo, Normalization, info_to_json
from smoothcert.models.reproducible import init_weights, single_threaded
from smoothcert.models.safetensors_io import save_safetensors_model

DEMO_ARCH = "digits_cnn"
DEMO_SIGMA = 0.25
TEST_FRACTION = 0.2
EPOCHS = 20
BATCH_SIZE = 128
LEARNING_RATE = 5e-3


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 (N, 1, 8, 8) in [0, 1] and int64 labels.

    Returns ``(train_x, train_y, test_x, test_y)``; the test split is the last 20% of the
    dataset, in its bundled order, so it is the same on every machine.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    split = len(x) - int(round(TEST_FRACTION * len(x)))
    return x[:split], y[:split], x[split:], y[split:]


def train_digits_cnn(
    train_x: np.ndarray, train_y: np.ndarray, norm: Normalization, seed: int = 0
) -> nn.Sequential:
    """``Sequential(Normalize, digits_cnn)`` trained with Gaussian augmentation at DEMO_SIGMA."""
    generator = torch.Generator().manual_seed(seed)
    # Construction draws a throwaway init from the global generator; fork_rng leaves it as it was.
    with torch.random.fork_rng(devices=[]):
        net = build_network(DEMO_ARCH, 10)
    init_weights(net, generator)
    model = nn.Sequential(Normalize(norm, 1), net)
    model.train()
    with single_threaded():
        _train_epochs(model, torch.from_numpy(train_x), torch.from_numpy(train_y), generator)
    return model.eval()


def _train_epochs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    for _ in range(EPOCHS):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            noisy = x[idx] + DEMO_SIGMA * torch.randn(x[idx].shape, generator=generator)
            loss = nn.functional.cross_entropy(model(noisy), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()


def export_onnx(
    model: nn.Module,
    path: Path,
    metadata_json: str,
    input_shape: tuple[int, int, int] = DEFAULT_INPUT_SHAPE[DEMO_ARCH],
) -> None:
    """Write ``model`` (normalization included) taking (B, *input_shape) as ONNX with a dynamic
    batch axis, and ``metadata_json`` under key ``smoothcert`` in its metadata_props. Needs the
    ``onnx`` package (torch's exporter itself imports it)."""
    import onnx

    dummy = torch.zeros((2, *input_shape))
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and still the
        warnings.simplefilter("ignore", DeprecationWarning)  # one that needs no onnxscript
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            opset_version=17,
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(path))
    proto.metadata_props.add(key=METADATA_KEY, value=metadata_json)
    onnx.save(proto, str(path))


def build_demo(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Train the demo model and write it to ``out_dir`` (created if needed).

    Returns paths keyed ``safetensors`` (digits_cnn.safetensors, self-describing), ``onnx``
    (digits_cnn.onnx, same model and metadata), ``test_x`` (digits_test_x.npy, float32
    (N, 1, 8, 8) in [0, 1]) and ``test_y`` (digits_test_y.npy, int64). Same seed, same files'
    contents (on the same torch build). The clean test accuracy is recorded in the metadata's
    ``extra``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = load_digits_split()
    norm = Normalization(mean=(float(train_x.mean()),), std=(float(train_x.std()),))
    model = train_digits_cnn(train_x, train_y, norm, seed)
    with torch.inference_mode(), single_threaded():
        predictions = model(torch.from_numpy(test_x)).argmax(dim=1).numpy()
    accuracy = float((predictions == test_y).mean())
    info = ModelInfo(
        format="safetensors",
        input_shape=DEFAULT_INPUT_SHAPE[DEMO_ARCH],
        num_classes=10,
        arch=DEMO_ARCH,
        class_names=[str(d) for d in range(10)],
        normalization=norm,
        sigma=DEMO_SIGMA,
        name="digits-demo",
        extra={
            "method": "gaussian_augmentation",
            "epochs": EPOCHS,
            "seed": seed,
            "clean_test_accuracy": accuracy,
            "dataset": "sklearn load_digits",
        },
    )
    paths = {
        "safetensors": out / "digits_cnn.safetensors",
        "onnx": out / "digits_cnn.onnx",
        "test_x": out / "digits_test_x.npy",
        "test_y": out / "digits_test_y.npy",
    }
    save_safetensors_model(paths["safetensors"], model[1], info)
    export_onnx(model, paths["onnx"], info_to_json(info))
    np.save(paths["test_x"], test_x)
    np.save(paths["test_y"], test_y)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m smoothcert.models.demo OUT_DIR [--seed N]``."""
    parser = argparse.ArgumentParser(description="Train and write the digits demo model.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for kind, path in build_demo(args.out_dir, args.seed).items():
        print(f"{kind}\t{path}")


if __name__ == "__main__":
    main()
