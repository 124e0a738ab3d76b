"""The allow-list of architectures a safetensors file may name.

Each entry maps ``num_classes`` to a network *without* input normalization (the loader puts a
:class:`~smoothcert.models.base.Normalize` layer in front). Every network names its last linear
layer ``fc``, so the class count of bare weights can be read from ``fc.weight``.

State-dict layouts are kept compatible with published checkpoints:

- ``cifar_resnet20`` / ``cifar_resnet110``: He et al.'s CIFAR ResNet (6n+2 layers, basic blocks,
  16/32/64 channels) with the key layout of Cohen et al.'s ``code/archs/cifar_resnet.py``
  (``conv1, bn1, layerK.i.conv1/bn1/conv2/bn2, layerK.0.downsample.0/1, fc``).
- ``imagenet_resnet50``: Bottleneck ResNet-50 whose keys and shapes equal torchvision's
  ``resnet50`` (stride on the 3x3 convolution, "ResNet v1.5").
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from smoothcert.models.metadata import ModelError, check_num_classes

HEAD_WEIGHT_KEY = "fc.weight"  # (num_classes, features) in every allow-listed architecture


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digit images (scikit-learn's ``load_digits``)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc = nn.Linear(128, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv1(x))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(x.flatten(1)))
        return self.fc(x)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """1x1 projection shortcut; keys ``downsample.0`` (conv) and ``downsample.1`` (batch norm)."""
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            _downsample(in_planes, planes, stride) if stride != 1 or in_planes != planes else None
        )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, as in torchvision."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            _downsample(in_planes, out_planes, stride)
            if stride != 1 or in_planes != out_planes
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def _make_stage(
    block: type[BasicBlock] | type[Bottleneck],
    in_planes: int,
    planes: int,
    blocks: int,
    stride: int,
) -> nn.Sequential:
    layers = [block(in_planes, planes, stride)]
    layers += [block(planes * block.expansion, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet of depth 6n+2 (basic blocks, 16/32/64 channels)."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, not {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _make_stage(BasicBlock, 16, 16, n, stride=1)
        self.layer2 = _make_stage(BasicBlock, 16, 32, n, stride=2)
        self.layer3 = _make_stage(BasicBlock, 32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the original's AvgPool2d(8) at 32x32 input
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class ImageNetResNet50(nn.Module):
    """ResNet-50 with torchvision's ``resnet50`` state-dict layout (keys and shapes)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _make_stage(Bottleneck, 64, 64, 3, stride=1)
        self.layer2 = _make_stage(Bottleneck, 256, 128, 4, stride=2)
        self.layer3 = _make_stage(Bottleneck, 512, 256, 6, stride=2)
        self.layer4 = _make_stage(Bottleneck, 1024, 512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "cifar_resnet20": lambda num_classes: CifarResNet(20, num_classes),
    "cifar_resnet110": lambda num_classes: CifarResNet(110, num_classes),
    "imagenet_resnet50": ImageNetResNet50,
}

DEFAULT_INPUT_SHAPE: dict[str, tuple[int, int, int]] = {
    "digits_cnn": (1, 8, 8),
    "cifar_resnet20": (3, 32, 32),
    "cifar_resnet110": (3, 32, 32),
    "imagenet_resnet50": (3, 224, 224),
}

DEFAULT_NUM_CLASSES: dict[str, int] = {
    "digits_cnn": 10,
    "cifar_resnet20": 10,
    "cifar_resnet110": 10,
    "imagenet_resnet50": 1000,
}


def check_arch(arch: str) -> str:
    """Return ``arch`` if it is on the allow-list, else raise ModelError naming the allowed ones."""
    if arch not in ARCHITECTURES:
        allowed = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"unknown architecture {arch!r}; allowed: {allowed}")
    return arch


def build_network(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialized ``arch`` network (no normalization layer) with ``num_classes`` outputs.

    Raises ModelError for an architecture off the allow-list or a class count below 1.
    """
    check_arch(arch)
    return ARCHITECTURES[arch](check_num_classes(num_classes))


class DnCNN(nn.Module):
    """A residual denoiser after Zhang et al.'s DnCNN, without batch norm: ``depth`` 3x3
    convolutions (``width`` channels between them, ReLU after all but the last) estimate the noise
    of a (B, C, H, W) batch, and the output is the input minus that estimate. Keys
    ``layers.<2i>.weight`` / ``.bias``; the first convolution takes ``channels`` channels."""

    def __init__(self, channels: int, depth: int = 6, width: int = 32):
        super().__init__()
        if depth < 2 or width < 1 or channels < 1:
            raise ValueError(
                f"DnCNN needs depth >= 2, width >= 1 and channels >= 1, not {depth}/{width}/{channels}"
            )
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x - self.layers(x)


class _TimestepEmbedding(nn.Module):
    """Sinusoidal features of the (0-based) timestep t, through a two-layer MLP: (B,) -> (B, width)."""

    def __init__(self, width: int):
        super().__init__()
        self.n_freqs = max(1, width // 2)  # not `half`: that is Module.half()
        self.mlp = nn.Sequential(
            nn.Linear(2 * self.n_freqs, 2 * width), nn.SiLU(), nn.Linear(2 * width, width)
        )

    def forward(self, t: Tensor) -> Tensor:
        steps = torch.arange(self.n_freqs, device=t.device, dtype=torch.float32)
        freqs = torch.exp(steps * (-math.log(10000.0) / self.n_freqs))
        args = t.to(torch.float32).reshape(-1, 1) * freqs.reshape(1, -1)
        return self.mlp(torch.cat([torch.sin(args), torch.cos(args)], dim=1))


class _TimeBlock(nn.Module):
    """Two 3x3 convolutions with the timestep embedding added between them, and a shortcut."""

    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.act(self.conv1(x)) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(self.act(h))


class DiffusionUNet(nn.Module):
    """A small ε-prediction U-Net: ``forward(x_t, t)`` takes images (B, C, H, W) in the model's
    [−1, 1] scale with noise of timestep ``t`` (B,) (0-based, int64) and returns the noise
    estimate ε̂ of the same shape. ``width`` channels at full resolution, doubled at each of
    ``levels`` stride-2 down-samplings (H and W must be divisible by 2^levels); every block sees a
    sinusoidal embedding of t. One-step denoising with it is :mod:`smoothcert.models.diffusion`."""

    def __init__(self, channels: int, width: int = 32, levels: int = 1):
        super().__init__()
        if width < 2 or channels < 1 or not 0 <= levels <= 4:
            raise ValueError(
                f"diffusion_unet needs width >= 2, channels >= 1 and 0 <= levels <= 4, not "
                f"{width}/{channels}/{levels}"
            )
        widths = [width * 2**i for i in range(levels + 1)]
        self.embed = _TimestepEmbedding(width)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down_blocks = nn.ModuleList(_TimeBlock(w, w, width) for w in widths[:-1])
        self.downs = nn.ModuleList(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1) for w in widths[:-1])
        self.middle = _TimeBlock(widths[-1], widths[-1], width)
        self.ups = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * w, w, 3, padding=1)
            )
            for w in widths[:-1]
        )
        self.up_blocks = nn.ModuleList(_TimeBlock(2 * w, w, width) for w in widths[:-1])
        self.out = nn.Sequential(nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.embed(t)
        h = self.inp(x)
        skips = []
        for block, down in zip(self.down_blocks, self.downs):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.middle(h, emb)
        for up, block in zip(reversed(self.ups), reversed(self.up_blocks)):
            h = block(torch.cat([up(h), skips.pop()], dim=1), emb)
        return self.out(h)


def diffusion_levels(height: int, width: int, most: int = 2) -> int:
    """The down-samplings a diffusion_unet makes for (height, width) images: as many as keep both
    divisible and the coarsest map at least 4 pixels a side, at most ``most`` (digits 8x8: 1,
    CIFAR 32x32: 2)."""
    levels = 0
    while (
        levels < most
        and height % 2 ** (levels + 1) == 0
        and width % 2 ** (levels + 1) == 0
        and min(height, width) // 2 ** (levels + 1) >= 4
    ):
        levels += 1
    return levels


# Denoisers map [0,1] images to images of the same shape; they are built from the input's
# channel count and their own size parameters (recorded in the file's metadata), not a class count.
# diffusion_unet is an ε-prediction network (x_t, t) -> ε̂, a denoiser only through
# smoothcert.models.diffusion's one-step denoising at a bound σ.
DENOISER_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "dncnn": DnCNN,
    "diffusion_unet": DiffusionUNet,
}
DENOISER_DEFAULTS: dict[str, dict[str, int]] = {
    "dncnn": {"depth": 6, "width": 32},
    "diffusion_unet": {"width": 32, "levels": 1},
}
DIFFUSION_ARCHITECTURES = frozenset({"diffusion_unet"})


def build_denoiser(arch: str, channels: int, **size: int) -> nn.Module:
    """A freshly initialized denoiser ``arch`` for images of ``channels`` channels; ``size`` are its
    size parameters (DnCNN: ``depth``, ``width``), the architecture's defaults for those left out.
    ModelError for an architecture off the denoiser allow-list or a size it cannot take."""
    if arch not in DENOISER_ARCHITECTURES:
        allowed = ", ".join(sorted(DENOISER_ARCHITECTURES))
        raise ModelError(f"unknown denoiser architecture {arch!r}; allowed: {allowed}")
    unknown = sorted(set(size) - set(DENOISER_DEFAULTS[arch]))
    if unknown:
        raise ModelError(
            f"{arch} has no size parameter {', '.join(unknown)}; it takes "
            f"{', '.join(DENOISER_DEFAULTS[arch])}"
        )
    try:
        return DENOISER_ARCHITECTURES[arch](channels, **{**DENOISER_DEFAULTS[arch], **size})
    except (TypeError, ValueError) as exc:
        raise ModelError(str(exc)) from None
