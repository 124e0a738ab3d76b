"""The allow-list: layouts that published checkpoints (torchvision, Cohen et al.) load into."""

from __future__ import annotations

import pytest
import torch

from smoothcert.models.architectures import (
    ARCHITECTURES,
    DEFAULT_INPUT_SHAPE,
    DEFAULT_NUM_CLASSES,
    HEAD_WEIGHT_KEY,
    build_network,
)
from smoothcert.models.metadata import ModelError


def _meta_network(arch: str, num_classes: int) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only, no initialization cost
        return build_network(arch, num_classes)


def test_resnet50_state_dict_matches_torchvision_layout():
    net = _meta_network("imagenet_resnet50", 1000)
    state = net.state_dict()
    # torchvision.models.resnet50().state_dict(): 320 entries, 25,557,032 parameters.
    assert len(state) == 320
    assert sum(p.numel() for p in net.parameters()) == 25_557_032
    keys = list(state)
    assert keys[:6] == [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
    ]
    assert keys[-2:] == ["fc.weight", "fc.bias"]
    expected_shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_var": (256,),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "layer3.5.conv3.weight": (1024, 256, 1, 1),
        "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
        "layer4.2.bn3.weight": (2048,),
        "layer4.2.bn3.num_batches_tracked": (),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    }
    assert {k: tuple(state[k].shape) for k in expected_shapes} == expected_shapes
    assert sorted({k.split(".")[0] for k in keys if k.startswith("layer")}) == [
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ]
    assert [k for k in keys if "downsample.0" in k] == [
        f"layer{i}.0.downsample.0.weight" for i in (1, 2, 3, 4)
    ]
    assert "layer3.6.conv1.weight" not in state and "layer3.5.conv1.weight" in state


def test_resnet50_stride_sits_on_the_3x3_convolution():
    net = _meta_network("imagenet_resnet50", 1000)
    assert net.layer2[0].conv1.stride == (1, 1) and net.layer2[0].conv2.stride == (2, 2)


@pytest.mark.parametrize(
    "arch, blocks, params", [("cifar_resnet20", 3, 272_474), ("cifar_resnet110", 18, 1_730_714)]
)
def test_cifar_resnet_uses_cohen_et_al_key_layout(arch, blocks, params):
    net = _meta_network(arch, 10)
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == params
    assert tuple(state["conv1.weight"].shape) == (16, 3, 3, 3)
    assert "bn1.running_mean" in state
    assert tuple(state["layer1.0.conv1.weight"].shape) == (16, 16, 3, 3)
    assert tuple(state[f"layer3.{blocks - 1}.bn2.weight"].shape) == (64,)
    assert f"layer3.{blocks}.conv1.weight" not in state
    # Projection shortcuts only where the width or resolution changes.
    assert [k for k in state if k.endswith("downsample.0.weight")] == [
        "layer2.0.downsample.0.weight",
        "layer3.0.downsample.0.weight",
    ]
    assert tuple(state["layer2.0.downsample.0.weight"].shape) == (32, 16, 1, 1)
    assert tuple(state["layer3.0.downsample.1.running_var"].shape) == (64,)
    assert tuple(state["fc.weight"].shape) == (10, 64)


@pytest.mark.parametrize("arch", ["digits_cnn", "cifar_resnet20"])
def test_small_networks_run_on_their_default_input_shape(arch):
    net = build_network(arch, 7).eval()
    with torch.no_grad():
        out = net(torch.zeros((2, *DEFAULT_INPUT_SHAPE[arch])))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_has_defaults_and_an_fc_head(arch):
    assert len(DEFAULT_INPUT_SHAPE[arch]) == 3 and DEFAULT_NUM_CLASSES[arch] >= 2
    state = _meta_network(arch, 13).state_dict()
    assert state[HEAD_WEIGHT_KEY].shape[0] == 13


def test_unknown_architecture_is_refused_with_the_allowed_names():
    with pytest.raises(
        ModelError, match="unknown architecture 'vgg16'.*cifar_resnet20.*digits_cnn"
    ):
        build_network("vgg16", 10)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10"])
def test_class_count_must_be_a_positive_integer(bad):
    with pytest.raises(ModelError, match="num_classes"):
        build_network("digits_cnn", bad)
