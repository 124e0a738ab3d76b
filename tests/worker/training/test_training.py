"""Training recipes on a small synthetic problem: they learn, noise training pays off under noise,
a killed run resumes to the same weights, and the CLI writes a model `smoothcert certify` takes."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from smoothcert.models.base import Normalize
from smoothcert.models.loaders import load_model
from smoothcert.service.cli.train import add_commands
from smoothcert.worker.data.datasets import Dataset
from smoothcert.worker.smoothing import Canceled
from smoothcert.worker.training import checkpoints as training_checkpoint
from smoothcert.worker.training.trainer import METHODS, TrainConfig, TrainingError, train
from tests.support.paths import ROOT


def strokes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four classes of 8x8 images: a horizontal, vertical, diagonal or anti-diagonal stroke of
    five pixels at a random place on a dim background."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=n)
    x = np.full((n, 1, 8, 8), 0.1, dtype=np.float32)
    i = np.arange(5)
    for j in range(n):
        r, c = rng.integers(0, 4, size=2)
        rows, cols = [
            (r + 1 + 0 * i, c + i),
            (r + i, c + 1 + 0 * i),
            (r + i, c + i),
            (r + i, c + 4 - i),
        ][y[j]]
        x[j, 0, rows, cols] += 0.8
    return x, y.astype(np.int64)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> Dataset:
    return Dataset("strokes", *strokes(256, 0), *strokes(512, 1), class_names=["h", "v", "d", "a"])


def small(method: str = "gaussian", **overrides) -> TrainConfig:
    values = dict(
        method=method,
        sigma=0.25,
        epochs=4,
        batch_size=32,
        lr=5e-3,
        m=2,
        epsilon=0.25,
        steps=2,
        warmup_epochs=2,
        seed=1,
    )
    return TrainConfig(**{**values, **overrides})


def accuracy_under_noise(result, data: Dataset, sigma: float, repeats: int = 4) -> float:
    """The base classifier's accuracy on ``repeats`` noisy copies of every test image."""
    model = torch.nn.Sequential(Normalize(result.info.normalization, 1), result.network).eval()
    generator = torch.Generator().manual_seed(123)
    x, y = torch.from_numpy(data.test_x), torch.from_numpy(data.test_y)
    with torch.no_grad():
        hits = [
            (model(x + sigma * torch.randn(x.shape, generator=generator)).argmax(1) == y)
            .float()
            .mean()
            for _ in range(repeats)
        ]
    return float(torch.stack(hits).mean())


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_its_loss_and_learns(data, method):
    losses = []
    result = train(small(method), data, progress=lambda epoch: losses.append(epoch.loss))
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]
    assert result.metrics["test_clean_accuracy"] > 0.6
    assert [h.epoch for h in result.history] == [1, 2, 3, 4]
    if method == "smoothadv":  # ε warms up linearly over two epochs
        assert [h.epsilon for h in result.history] == [0.125, 0.25, 0.25, 0.25]


def test_training_with_noise_beats_training_without_under_that_noise(data):
    # Same seed: same initial weights and data order; only the training noise differs.
    noisy = train(small(sigma=0.25, epochs=5), data)
    clean = train(small(sigma=0.0, epochs=5), data)
    assert clean.metrics["test_clean_accuracy"] > 0.95
    assert accuracy_under_noise(noisy, data, 0.25) > accuracy_under_noise(clean, data, 0.25) + 0.1


def test_training_is_seeded_and_leaves_the_global_rng_alone(tiny):
    before = torch.random.get_rng_state()
    a, b = train(small(epochs=1), tiny), train(small(epochs=1), tiny)
    other = train(small(epochs=1, seed=2), tiny)
    assert torch.equal(before, torch.random.get_rng_state())
    assert all(torch.equal(a.network.state_dict()[k], v) for k, v in b.network.state_dict().items())
    assert not torch.equal(
        a.network.state_dict()["fc.weight"], other.network.state_dict()["fc.weight"]
    )


class Killed(Exception):
    pass


@pytest.mark.parametrize("method,optimizer", [("smoothadv", "adam"), ("gaussian", "sgd")])
def test_a_killed_run_resumes_from_its_last_epoch_to_the_same_weights(
    tiny, tmp_path, method, optimizer
):
    data = tiny
    config = small(method, epochs=3, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 5e-3)
    uninterrupted = train(config, data)

    def kill_after_epoch_2(metrics):
        if metrics.epoch == 2:
            raise Killed  # as if the process died right after the epoch-2 checkpoint

    with pytest.raises(Killed):
        train(config, data, progress=kill_after_epoch_2, checkpoint_dir=tmp_path)
    assert training_checkpoint.load_state(tmp_path).epoch == 2
    seen = []
    resumed = train(config, data, progress=lambda m: seen.append(m.epoch), checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 2 and seen == [3]
    assert [h.epoch for h in resumed.history] == [1, 2, 3]
    expected = uninterrupted.network.state_dict()
    for key, value in resumed.network.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # A finished checkpoint is returned as it is, without training again.
    again = train(
        config, data, progress=lambda m: pytest.fail("trained again"), checkpoint_dir=tmp_path
    )
    assert again.resumed_from == 3 and torch.equal(
        again.network.fc.weight, resumed.network.fc.weight
    )


KILLED_RUN = """
import os, signal, sys, torch
sys.path.insert(0, sys.argv[2])
torch.set_num_threads(1)
from tests.worker.training.test_training import strokes, small
from smoothcert.worker.data.datasets import Dataset
from smoothcert.worker.training.trainer import train

def die(metrics):
    if metrics.epoch == 2:
        os.kill(os.getpid(), signal.SIGKILL)

train(small("smoothed", epochs=3), Dataset("tiny-strokes", *strokes(96, 5), *strokes(64, 6)),
      progress=die, checkpoint_dir=sys.argv[1])
"""


@pytest.mark.process
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(tiny, tmp_path):
    root = ROOT
    done = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(tmp_path), str(root)], capture_output=True
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    resumed = train(small("smoothed", epochs=3), tiny, checkpoint_dir=tmp_path)
    uninterrupted = train(small("smoothed", epochs=3), tiny)
    assert resumed.resumed_from == 2
    for key, value in resumed.network.state_dict().items():
        assert torch.equal(value, uninterrupted.network.state_dict()[key]), key


def test_a_checkpoint_is_safetensors_with_json_never_a_pickle(tiny, tmp_path):
    train(small(epochs=1), tiny, checkpoint_dir=tmp_path)
    path = tmp_path / training_checkpoint.CHECKPOINT_FILE
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    doc = json.loads(header["__metadata__"]["smoothcert_training"])
    assert doc["epoch"] == 1 and doc["identity"]["method"] == "gaussian"
    assert {"generator", "model/fc.weight", "optimizer/0/exp_avg"} <= set(header)


def test_a_checkpoint_of_another_run_is_refused(tiny, tmp_path):
    train(small(epochs=1), tiny, checkpoint_dir=tmp_path)
    with pytest.raises(TrainingError, match="belongs to another run.*sigma"):
        train(small(epochs=1, sigma=0.5), tiny, checkpoint_dir=tmp_path)


def test_cancel_stops_between_batches_and_keeps_the_last_epoch(data, tmp_path):
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 12  # 8 batches per epoch: cancel in the second epoch

    with pytest.raises(Canceled):
        train(small(epochs=3), data, should_cancel=should_cancel, checkpoint_dir=tmp_path)
    assert len(calls) == 13 and training_checkpoint.load_state(tmp_path).epoch == 1


def test_the_result_is_a_self_describing_model(data, tmp_path):
    result = train(small("smoothed", epochs=1), data, name="strokes-model")
    model = load_model(result.save(tmp_path / "m.safetensors"), device="cpu")
    info = model.info
    assert info.arch == "digits_cnn" and info.input_shape == (1, 8, 8) and info.num_classes == 4
    assert (
        info.sigma == 0.25
        and info.class_names == ["h", "v", "d", "a"]
        and info.name == "strokes-model"
    )
    assert info.normalization.mean[0] == pytest.approx(float(data.x.mean()), rel=1e-5)
    assert info.normalization.std[0] == pytest.approx(float(data.x.std()), rel=1e-4)
    assert info.extra["method"] == "smoothed" and info.extra["training"]["m"] == 2
    assert "epsilon" not in info.extra["training"] and info.extra["metrics"]["train_size"] == 256


@pytest.mark.parametrize(
    "values,message",
    [
        ({"method": "mixup"}, "method must be one of"),
        ({"sigma": -0.1}, "sigma must be a non-negative number"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"m": 1.5}, "m must be an integer"),
        ({"lr": 0}, "lr must be a positive number"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of"),
    ],
)
def test_bad_configurations_are_refused_in_one_line(values, message):
    with pytest.raises(TrainingError, match=message):
        TrainConfig(**values)


def test_config_round_trips_through_a_message_and_refuses_unknown_fields():
    config = small("smoothadv")
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(TrainingError, match="unknown training parameter"):
        TrainConfig.from_dict({"method": "gaussian", "momentum": 0.9})


def test_an_architecture_that_cannot_take_the_images_is_refused(data):
    with pytest.raises(
        TrainingError, match="cifar_resnet20 cannot take strokes's images of shape \\[1, 8, 8\\]"
    ):
        train(small(arch="cifar_resnet20"), data)
    with pytest.raises(TrainingError, match="unknown architecture"):
        train(small(arch="vgg16"), data)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="smoothcert")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_smoothcert_train_writes_a_model_that_certify_takes(tmp_path, capsys):
    from smoothcert.service.cli.main import main as smoothcert

    data_path = tmp_path / "strokes.npz"
    np.savez(data_path, x=(strokes(128, 3)[0] * 255).astype(np.uint8), y=strokes(128, 3)[1])
    out = tmp_path / "model.safetensors"
    assert (
        _cli(
            [
                "train",
                "--dataset",
                str(data_path),
                "--method",
                "smoothadv",
                "--sigma",
                "0.5",
                "--epochs",
                "1",
                "--m",
                "2",
                "--seed",
                "3",
                "--out",
                str(out),
                "--checkpoint-dir",
                str(tmp_path / "ckpt"),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(out)
    model = load_model(out, device="cpu")
    assert model.info.sigma == 0.5 and model.info.extra["training"]["seed"] == 3
    assert model.info.extra["training"]["dataset"] == "strokes.npz"

    x = tmp_path / "x.npy"
    np.save(x, strokes(4, 4)[0])
    assert (
        smoothcert(
            [
                "certify",
                str(out),
                "--inputs",
                str(x),
                "--sigma",
                "0.5",
                "--n0",
                "20",
                "--n",
                "200",
                "--seed",
                "0",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.strip().splitlines()) == 5  # header + 4 rows


def test_smoothcert_train_rerun_resumes_with_the_checkpoints_seed(tmp_path, capsys):
    argv = [
        "train",
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "d.safetensors"),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
    ]
    assert _cli(argv) == 0
    first = load_model(tmp_path / "d.safetensors", device="cpu").info.extra["training"]["seed"]
    capsys.readouterr()
    assert _cli(argv) == 0  # no --seed: the checkpoint's is used
    assert "resumed after epoch 1" in capsys.readouterr().err
    assert (
        load_model(tmp_path / "d.safetensors", device="cpu").info.extra["training"]["seed"] == first
    )
