"""Importing checkpoints laid out as Cohen et al.'s and Salman et al.'s releases, written here."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch

from smoothcert.models.architectures import build_network
from smoothcert.models.loaders import load_model
from smoothcert.models.metadata import ModelError
from smoothcert.service.cli.train import add_commands
from smoothcert.worker.training.checkpoint_import import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    NORMALIZATIONS,
    import_checkpoint,
    parse_normalization,
    read_checkpoint,
)


class CohenNormalizeLayer(torch.nn.Module):
    """Like the releases' NormalizeLayer / InputCenterLayer: constants kept out of the state dict."""

    def __init__(self, mean, std=None):
        super().__init__()
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(1, -1, 1, 1)

    def forward(self, x):
        x = x - self.mean
        return x if self.std is None else x / self.std


@pytest.fixture(scope="module")
def network():
    """A cifar_resnet20 with random weights and batch-norm statistics, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_network("cifar_resnet20", 10)
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.data.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _save_cohen(path, network, std=CIFAR10_STD, prefix=""):
    wrapped = torch.nn.Sequential(CohenNormalizeLayer(CIFAR10_MEAN, std), network)
    state = {prefix + k: v for k, v in wrapped.state_dict().items()}
    torch.save(
        {
            "epoch": 90,
            "arch": "cifar_resnet20",
            "state_dict": state,
            "optimizer": {
                "state": {},
                "param_groups": [{"lr": 0.001, "momentum": 0.9, "params": [0, 1]}],
            },
        },
        path,
    )
    return wrapped


def test_cohen_layout_round_trips_to_the_same_logits(tmp_path, network, images):
    source = tmp_path / "noise_0.25" / "checkpoint.pth.tar"
    source.parent.mkdir()
    wrapped = _save_cohen(source, network)
    assert next(iter(torch.load(source, weights_only=True)["state_dict"])) == "1.conv1.weight"
    imported = import_checkpoint(
        source, tmp_path / "m.safetensors", normalization=parse_normalization("cifar10")
    )
    model = load_model(tmp_path / "m.safetensors", device="cpu")
    with torch.no_grad():
        assert torch.allclose(model.logits(images), wrapped(images), atol=1e-5)
    info = model.info
    assert (
        info.arch == "cifar_resnet20" and info.num_classes == 10 and info.input_shape == (3, 32, 32)
    )
    assert info.normalization.std == CIFAR10_STD and info.sigma == 0.25  # read from noise_0.25
    assert imported.epoch == 90 and imported.checkpoint_arch == "cifar_resnet20"
    assert (
        info.extra["imported_from"] == "checkpoint.pth.tar"
        and len(info.extra["source_sha256"]) == 64
    )


@pytest.mark.parametrize("prefix", ["module.", "1.module."])
def test_salman_mean_only_centering_and_dataparallel_prefixes(tmp_path, network, images, prefix):
    # "1.module." is the ImageNet layout (DataParallel inside the Sequential); "module." wraps it all.
    wrapped = torch.nn.Sequential(CohenNormalizeLayer(CIFAR10_MEAN), network)
    state = {
        (prefix + k[2:] if prefix == "1.module." else prefix + k): v
        for k, v in wrapped.state_dict().items()
    }
    torch.save({"arch": "cifar_resnet20", "state_dict": state}, tmp_path / "salman.pth.tar")
    import_checkpoint(
        tmp_path / "salman.pth.tar",
        tmp_path / "s.safetensors",
        normalization=parse_normalization("cifar10-center"),
        sigma=0.5,
    )
    model = load_model(tmp_path / "s.safetensors", device="cpu")
    assert model.info.normalization.std is None and model.info.sigma == 0.5
    with torch.no_grad():
        assert torch.allclose(model.logits(images), wrapped(images), atol=1e-5)


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save(
        {
            "arch": "cifar_resnet20",
            "state_dict": {"1.fc.weight": torch.zeros(10, 64)},
            "x": Payload(),
        },
        tmp_path / "evil.pth",
    )
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    for name in ("evil.pth", "evil.pkl"):
        with pytest.raises(ModelError, match=f"{name}: refused: it holds Python objects"):
            import_checkpoint(tmp_path / name, tmp_path / "out.safetensors", normalization=None)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_mismatches_are_refused_in_one_line(tmp_path, network):
    _save_cohen(tmp_path / "c.pth", network)
    with pytest.raises(ModelError, match="holds a 'cifar_resnet20' network, not 'cifar_resnet110'"):
        import_checkpoint(
            tmp_path / "c.pth",
            tmp_path / "o.safetensors",
            normalization=None,
            arch="cifar_resnet110",
        )
    torch.save(
        {"arch": "cifar_resnet20", "state_dict": {"1.fc.weight": torch.zeros(10, 64)}},
        tmp_path / "p.pth",
    )
    with pytest.raises(ModelError, match="weights do not fit cifar_resnet20: missing"):
        import_checkpoint(tmp_path / "p.pth", tmp_path / "o.safetensors", normalization=None)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ModelError, match="expected a dict with 'arch' and 'state_dict'"):
        read_checkpoint(tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ModelError, match="junk.pth: not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(ModelError, match="unknown normalization 'cifar100'"):
        parse_normalization("cifar100")


def test_published_arch_names_map_to_the_allow_list(tmp_path):
    # Cohen's ImageNet checkpoints say "resnet50"; a bare state dict needs --arch.
    assert NORMALIZATIONS["imagenet-center"].std is None
    torch.save({"1.fc.weight": torch.zeros(10, 64)}, tmp_path / "bare.pth")
    with pytest.raises(ModelError, match="does not name its architecture; give --arch"):
        import_checkpoint(tmp_path / "bare.pth", tmp_path / "o.safetensors", normalization=None)
    assert parse_normalization('{"mean": [0.5], "std": null}').std is None


def test_smoothcert_import_checkpoint(tmp_path, network, capsys):
    _save_cohen(tmp_path / "checkpoint.pth.tar", network)
    parser = argparse.ArgumentParser(prog="smoothcert")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "import-checkpoint",
            str(tmp_path / "checkpoint.pth.tar"),
            "--normalization",
            "cifar10",
            "--sigma",
            "0.12",
        ]
    )
    assert args.handler(args) == 0
    out = tmp_path / "checkpoint.safetensors"
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out) and "normalization mean and std" in captured.err
    assert load_model(out, device="cpu").info.sigma == 0.12
