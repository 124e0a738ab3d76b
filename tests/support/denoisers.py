"""Denoiser files for tests: a DnCNN with seeded random weights, written as self-describing safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from smoothcert.models.architectures import build_denoiser
from smoothcert.models.denoisers import save_denoiser
from smoothcert.models.metadata import DenoiserInfo
from smoothcert.models.reproducible import init_weights


def random_denoiser(
    path: Path,
    input_shape=(1, 8, 8),
    depth: int = 3,
    width: int = 8,
    seed: int = 0,
    scale: float = 1.0,
    name: str = "random-dncnn",
) -> Path:
    """A DnCNN of fresh weights drawn with ``seed`` and multiplied by ``scale`` (a large scale makes
    outputs far outside [0, 1] before the clamp)."""
    net = build_denoiser("dncnn", input_shape[0], depth=depth, width=width)
    init_weights(net, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return save_denoiser(
        path,
        net,
        DenoiserInfo(
            format="safetensors",
            input_shape=tuple(input_shape),
            arch="dncnn",
            sigma=0.5,
            name=name,
            extra={"depth": depth, "width": width},
        ),
    )
