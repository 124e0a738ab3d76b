"""The base classifier f that randomized smoothing wraps.

The engine only needs :meth:`BaseClassifier.classify`: a batch of noisy images in [0,1] pixel
space (already on :attr:`device`) in, top-1 labels (on the same device) out. Normalization is the
model's own business, applied after the noise.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from smoothcert.models.metadata import ModelInfo, Normalization


@runtime_checkable
class BaseClassifier(Protocol):
    info: ModelInfo
    device: torch.device   # where inputs and noise live
    runtime: str           # "torch" | "onnxruntime"
    provider: str          # what actually runs it, e.g. "cpu", "cuda:0", "CPUExecutionProvider"
    precision: str         # "float32", ...

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, K) for a float32 batch (B, C, H, W) on :attr:`device`."""

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Top-1 labels (B,) int64 on :attr:`device`."""


class Normalize(torch.nn.Module):
    """First layer of every torch model: (x - mean) / std per channel (std may be absent)."""

    def __init__(self, norm: Normalization | None, channels: int):
        super().__init__()
        mean = norm.mean if norm else (0.0,) * channels
        std = norm.std if norm and norm.std else (1.0,) * channels
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"normalization has {len(mean)} channels, the model takes {channels}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TorchClassifier:
    """A torch ``nn.Module`` (normalization included) as a base classifier, in eval mode."""

    runtime = "torch"

    def __init__(self, module: torch.nn.Module, info: ModelInfo, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.info = info
        self.provider = str(self.device)
        self.precision = "float32"

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @torch.inference_mode()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x).argmax(dim=1)
