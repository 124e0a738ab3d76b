"""Denoiser training on tiny problems: MSE learns, stability needs its classifier, a killed run
resumes to the same weights; `train-denoiser` writes a file `certify --denoiser` takes, and
`train --method standard` trains without noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smoothcert.models.denoisers import load_denoiser
from smoothcert.models.loaders import load_model
from smoothcert.service.cli.main import main
from smoothcert.service.core.train_config import DenoiserConfig, TrainConfig, TrainingError
from smoothcert.worker.training import checkpoints as training_checkpoint
from smoothcert.worker.training.denoiser import train_denoiser
from smoothcert.worker.training.trainer import train
from tests.worker.training.test_training import Killed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier(tiny, tmp_path_factory):
    """A digits_cnn trained without noise on the strokes, loaded as an upload would be."""
    path = tmp_path_factory.mktemp("clf") / "standard.safetensors"
    train(TrainConfig(method="standard", epochs=3, batch_size=32, seed=1), tiny).save(path)
    return load_model(path, device="cpu")


def small(objective: str = "mse", **overrides) -> DenoiserConfig:
    return DenoiserConfig(
        **{
            **dict(
                objective=objective,
                sigma=0.5,
                epochs=3,
                batch_size=32,
                lr=3e-3,
                depth=3,
                width=8,
                seed=2,
            ),
            **overrides,
        }
    )


def test_mse_training_lowers_the_denoising_error(tiny):
    result = train_denoiser(small(epochs=6, lr=1e-2, batch_size=16), tiny)
    x = torch.from_numpy(tiny.test_x)
    noise = 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    untouched = float(
        ((x + noise).clamp(0, 1) - x).pow(2).mean()
    )  # the error of returning the noisy input
    mse = [h.test_mse for h in result.history]
    assert mse[-1] < 0.6 * untouched and mse[-1] < mse[0]
    assert result.metrics["test_denoised_accuracy"] is None
    assert result.info.sigma == 0.5 and result.info.extra["objective"] == "mse"


def test_the_stability_objective_requires_a_classifier(tiny, tmp_path, capsys):
    with pytest.raises(TrainingError, match="stability objective needs the frozen classifier"):
        train_denoiser(small("stability"), tiny)
    code = main(
        [
            "train-denoiser",
            "--sigma",
            "0.5",
            "--objective",
            "stability",
            "--out",
            str(tmp_path / "d.st"),
        ]
    )
    assert code == 2 and "needs the frozen classifier" in capsys.readouterr().err
    assert not (tmp_path / "d.st").exists()


def test_a_killed_stability_run_resumes_to_the_same_weights(tiny, classifier, tmp_path):
    config = small("stability")
    uninterrupted = train_denoiser(config, tiny, classifier)

    def kill_after_epoch_2(metrics):
        if metrics.epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train_denoiser(
            config, tiny, classifier, progress=kill_after_epoch_2, checkpoint_dir=tmp_path
        )
    assert training_checkpoint.load_state(tmp_path).epoch == 2
    seen = []
    resumed = train_denoiser(
        config, tiny, classifier, progress=lambda m: seen.append(m.epoch), checkpoint_dir=tmp_path
    )
    assert resumed.resumed_from == 2 and seen == [3]
    expected = uninterrupted.network.state_dict()
    for key, value in resumed.network.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert resumed.metrics["test_denoised_accuracy"] is not None
    # A denoiser for another classifier is another run: its checkpoint is not resumed.
    other = TrainConfig(method="standard", epochs=1, batch_size=32, seed=9)
    train(other, tiny).save(tmp_path / "other.safetensors")
    with pytest.raises(TrainingError, match="belongs to another run"):
        train_denoiser(
            config,
            tiny,
            load_model(tmp_path / "other.safetensors", device="cpu"),
            checkpoint_dir=tmp_path,
        )


def test_cli_trains_a_standard_classifier_and_a_denoiser_that_certify_together(tmp_path, capsys):
    std, den = tmp_path / "std.safetensors", tmp_path / "den.safetensors"
    assert (
        main(["train", "--method", "standard", "--epochs", "1", "--seed", "1", "--out", str(std)])
        == 0
    )
    info = load_model(std, device="cpu").info
    assert (
        info.sigma == 0.0
        and info.extra["method"] == "standard"
        and info.extra["training"]["sigma"] == 0.0
    )
    assert (
        main(
            [
                "train-denoiser",
                "--sigma",
                "0.5",
                "--objective",
                "stability",
                "--classifier",
                str(std),
                "--epochs",
                "1",
                "--depth",
                "3",
                "--width",
                "8",
                "--seed",
                "1",
                "--out",
                str(den),
            ]
        )
        == 0
    )
    assert (
        load_denoiser(den, device="cpu").info.extra["training"]["classifier_sha256"] == info.sha256
    )
    capsys.readouterr()
    x = tmp_path / "x.npy"
    np.save(x, np.full((2, 1, 8, 8), 0.5, dtype=np.float32))
    assert (
        main(
            [
                "certify",
                str(std),
                "--denoiser",
                str(den),
                "--inputs",
                str(x),
                "--sigma",
                "0.5",
                "--n0",
                "10",
                "--n",
                "50",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("idx\t")


def test_stability_fine_tunes_an_mse_denoiser_given_as_init(tiny, classifier, tmp_path):
    mse = train_denoiser(small(epochs=2), tiny)
    mse.save(tmp_path / "mse.safetensors")
    init = load_denoiser(tmp_path / "mse.safetensors", device="cpu")
    scratch = train_denoiser(small("stability", epochs=1, lr=1e-9), tiny, classifier)
    tuned = train_denoiser(small("stability", epochs=1, lr=1e-9), tiny, classifier, init=init)
    # A learning rate of 1e-9 barely moves the weights: each run ends next to where it started.
    start = init.module.state_dict()
    assert all(
        torch.allclose(v, start[k], atol=1e-5) for k, v in tuned.network.state_dict().items()
    )
    assert not torch.allclose(
        scratch.network.state_dict()["layers.0.weight"], start["layers.0.weight"], atol=1e-3
    )
    assert tuned.info.extra["training"]["init_sha256"] == init.info.sha256
    with pytest.raises(TrainingError, match="is not the dncnn of depth 4"):
        train_denoiser(small("stability", depth=4), tiny, classifier, init=init)
