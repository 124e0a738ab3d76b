"""Denoiser training on tiny problems: MSE learns, stability needs its classifier and, without a
denoiser to start from, trains its MSE stage first (the README's two commands in one), a killed
run resumes to the same weights in either stage, one seed gives one denoiser; `train-denoiser`
writes a file `certify --denoiser` takes, and `train --method standard` trains without noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smoothcert.models.denoisers import load_denoiser
from smoothcert.models.loaders import load_model
from smoothcert.service.api.train_schemas import DenoiserTrainRequest, TrainRequest
from smoothcert.service.cli import remote
from smoothcert.service.cli.main import main
from smoothcert.service.core.train_config import DenoiserConfig, TrainConfig, TrainingError
from smoothcert.worker.training import checkpoints as training_checkpoint
from smoothcert.worker.training.denoiser import MSE_STAGE_DIR, mse_stage, train_denoiser
from smoothcert.worker.training.trainer import train
from tests.worker.training.test_training import Killed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier_file(tiny, tmp_path_factory):
    """A digits_cnn trained without noise on the strokes."""
    path = tmp_path_factory.mktemp("clf") / "standard.safetensors"
    train(TrainConfig(method="standard", epochs=3, batch_size=32, seed=1), tiny).save(path)
    return path


@pytest.fixture(scope="module")
def classifier(classifier_file):
    """That classifier, loaded as an upload would be."""
    return load_model(classifier_file, device="cpu")


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


def test_a_killed_two_stage_run_resumes_to_the_same_weights_in_either_stage(
    tiny, classifier, tmp_path
):
    config = small("stability", epochs=2, mse_epochs=2)
    uninterrupted = train_denoiser(config, tiny, classifier)

    def kill_after(epoch):
        def progress(metrics):
            if metrics.epoch == epoch:
                raise Killed

        return progress

    # killed in the MSE stage: only its checkpoint exists
    with pytest.raises(Killed):
        train_denoiser(config, tiny, classifier, progress=kill_after(1), checkpoint_dir=tmp_path)
    assert training_checkpoint.load_state(tmp_path / MSE_STAGE_DIR).epoch == 1
    assert training_checkpoint.load_state(tmp_path) is None
    # resumed, then killed after the first stability epoch
    with pytest.raises(Killed):
        train_denoiser(config, tiny, classifier, progress=kill_after(3), checkpoint_dir=tmp_path)
    assert training_checkpoint.load_state(tmp_path / MSE_STAGE_DIR).epoch == 2
    assert training_checkpoint.load_state(tmp_path).epoch == 1
    seen = []
    resumed = train_denoiser(
        config, tiny, classifier, progress=lambda m: seen.append(m.epoch), checkpoint_dir=tmp_path
    )
    assert resumed.resumed_from == 3 and seen == [4]
    assert [(h.epoch, h.stage) for h in resumed.history] == [
        (1, "mse"),
        (2, "mse"),
        (3, "stability"),
        (4, "stability"),
    ]
    expected = uninterrupted.network.state_dict()
    for key, value in resumed.network.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert resumed.metrics["test_denoised_accuracy"] is not None
    # A denoiser for another classifier is another run: refused before its MSE stage trains.
    other = TrainConfig(method="standard", epochs=1, batch_size=32, seed=9)
    train(other, tiny).save(tmp_path / "other.safetensors")
    trained = []
    with pytest.raises(TrainingError, match="belongs to another run.*classifier_sha256"):
        train_denoiser(
            config,
            tiny,
            load_model(tmp_path / "other.safetensors", device="cpu"),
            checkpoint_dir=tmp_path,
            progress=trained.append,
        )
    assert trained == []


def test_a_killed_one_stage_stability_run_resumes_to_the_same_weights(tiny, classifier, tmp_path):
    config = small("stability", mse_epochs=0)
    uninterrupted = train_denoiser(config, tiny, classifier)

    def kill_after_epoch_2(metrics):
        if metrics.epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train_denoiser(
            config, tiny, classifier, progress=kill_after_epoch_2, checkpoint_dir=tmp_path
        )
    assert training_checkpoint.load_state(tmp_path).epoch == 2
    assert not (tmp_path / MSE_STAGE_DIR).exists()
    seen = []
    resumed = train_denoiser(
        config, tiny, classifier, progress=lambda m: seen.append(m.epoch), checkpoint_dir=tmp_path
    )
    assert resumed.resumed_from == 2 and seen == [3]
    expected = uninterrupted.network.state_dict()
    for key, value in resumed.network.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_the_objectives_default_schedules_and_mse_stage():
    mse, stability = DenoiserConfig(seed=1), DenoiserConfig(objective="stability", seed=1)
    assert (mse.batch_size, mse.lr, mse.mse_epochs, mse.total_epochs) == (128, 1e-3, 0, 20)
    assert (stability.batch_size, stability.lr, stability.mse_epochs) == (32, 3e-4, 20)
    assert stability.total_epochs == 40
    # explicit values win, and the resolved values survive a round trip through a job message
    given = DenoiserConfig(objective="stability", batch_size=16, lr=1e-2, mse_epochs=3, seed=1)
    assert (given.batch_size, given.lr, given.mse_epochs) == (16, 1e-2, 3)
    assert DenoiserConfig.from_dict(given.to_dict()) == given
    assert DenoiserConfig(objective="stability", epochs=7, mse_epochs=0, seed=1).total_epochs == 7
    # the MSE stage: MSE's own schedule whatever the stability stage's, a seed derived from the run's
    first = mse_stage(given)
    assert (first.objective, first.epochs, first.batch_size, first.lr) == ("mse", 3, 128, 1e-3)
    assert first.seed == mse_stage(DenoiserConfig(objective="stability", seed=1)).seed != 1
    assert first.seed != mse_stage(DenoiserConfig(objective="stability", seed=2)).seed
    with pytest.raises(TrainingError, match="an mse run has none"):
        DenoiserConfig(mse_epochs=2)
    with pytest.raises(TrainingError, match="mse_epochs must be an integer from 0"):
        DenoiserConfig(objective="stability", mse_epochs=-1)


def test_stability_without_init_is_the_mse_denoiser_fine_tuned(tiny, classifier, tmp_path):
    config = DenoiserConfig(
        objective="stability", sigma=0.5, epochs=2, mse_epochs=1, depth=3, width=8, seed=5
    )
    result = train_denoiser(config, tiny, classifier)
    assert [(h.epoch, h.epochs, h.stage) for h in result.history] == [
        (1, 3, "mse"),
        (2, 3, "stability"),
        (3, 3, "stability"),
    ]
    assert [h.lr for h in result.history[:2]] == [1e-3, 3e-4]  # each stage's cosine starts afresh
    training = result.info.extra["training"]
    first = mse_stage(config)
    assert training["stages"][0]["seed"] == first.seed
    assert {k: v for k, v in training["stages"][0].items() if k != "state_sha256"} == {
        "objective": "mse",
        "epochs": 1,
        "batch_size": 128,
        "lr": 1e-3,
        "seed": first.seed,
    }
    assert training["stages"][1] == {
        "objective": "stability",
        "epochs": 2,
        "batch_size": 32,
        "lr": 3e-4,
        "seed": 5,
    }
    assert (training["batch_size"], training["lr"], training["mse_epochs"]) == (32, 3e-4, 1)
    assert training["init_sha256"] is None
    # The same as the README's two commands: the MSE denoiser of the derived seed, then stability
    # from its file, bit for bit.
    train_denoiser(first, tiny, classifier).save(tmp_path / "mse.safetensors")
    init = load_denoiser(tmp_path / "mse.safetensors", device="cpu")
    tuned = train_denoiser(config, tiny, classifier, init=init)
    assert [h.stage for h in tuned.history] == ["stability", "stability"]
    assert tuned.info.extra["training"]["mse_epochs"] == 0  # init: no MSE stage
    assert len(tuned.info.extra["training"]["stages"]) == 1
    expected = tuned.network.state_dict()
    for key, value in result.network.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_one_seed_gives_one_denoiser(tiny, classifier):
    config = small("stability", epochs=1, mse_epochs=1)
    one, two = (train_denoiser(config, tiny, classifier) for _ in range(2))
    assert one.info.extra["training"]["stages"] == two.info.extra["training"]["stages"]
    expected = one.network.state_dict()
    for key, value in two.network.state_dict().items():
        assert torch.equal(value, expected[key]), key
    other = train_denoiser(small("stability", epochs=1, mse_epochs=1, seed=3), tiny, classifier)
    assert not torch.equal(
        other.network.state_dict()["layers.0.weight"], expected["layers.0.weight"]
    )


def test_cli_stability_defaults_and_explicit_values(classifier_file, tmp_path, capsys):
    base = ["train-denoiser", "--sigma", "0.5", "--objective", "stability", "--classifier"]
    base += [str(classifier_file), "--epochs", "1", "--depth", "3", "--width", "8", "--seed", "2"]
    default, given = tmp_path / "default.safetensors", tmp_path / "given.safetensors"
    assert main([*base, "--out", str(default)]) == 0
    assert "with mse (1 epochs, batch 128, lr 0.001) then stability" in capsys.readouterr().err
    training = load_denoiser(default, device="cpu").info.extra["training"]
    assert [(s["objective"], s["batch_size"], s["lr"]) for s in training["stages"]] == [
        ("mse", 128, 1e-3),
        ("stability", 32, 3e-4),
    ]
    history = load_denoiser(default, device="cpu").info.extra["history"]
    assert [(h["epoch"], h["stage"]) for h in history] == [(1, "mse"), (2, "stability")]
    argv = [*base, "--batch-size", "16", "--lr", "0.01", "--mse-epochs", "2", "--out", str(given)]
    assert main(argv) == 0
    training = load_denoiser(given, device="cpu").info.extra["training"]
    assert [
        (s["objective"], s["epochs"], s["batch_size"], s["lr"]) for s in training["stages"]
    ] == [
        ("mse", 2, 128, 1e-3),
        ("stability", 1, 16, 1e-2),
    ]
    capsys.readouterr()
    # --init starts from that denoiser: no MSE stage, and --mse-epochs does not go with it
    assert main([*base, "--init", str(default), "--mse-epochs", "1"]) == 2
    assert "with --init it starts from that one" in capsys.readouterr().err
    # with --url, --mse-epochs goes to the service as mse_epochs, a field its request takes
    assert "mse_epochs" in remote.TRAIN_FIELDS["train-denoiser"]
    assert "mse_epochs" in DenoiserTrainRequest.model_fields


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
    scratch = train_denoiser(small("stability", epochs=1, lr=1e-9, mse_epochs=0), tiny, classifier)
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


def test_what_the_cli_sends_the_service_is_what_its_requests_take():
    for command, request in (("train", TrainRequest), ("train-denoiser", DenoiserTrainRequest)):
        assert set(remote.TRAIN_FIELDS[command]) <= set(request.model_fields), command
