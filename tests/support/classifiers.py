"""Base classifiers whose smoothed behaviour has a closed form, for the statistical tests."""

from __future__ import annotations

import torch

from smoothcert.models.base import TorchClassifier
from smoothcert.models.metadata import ModelInfo


class ConstantNet(torch.nn.Module):
    """Always class ``label``: p_A = 1 for every σ."""

    def __init__(self, label: int, num_classes: int):
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.num_classes, device=x.device)
        out[:, self.label] = 1.0
        return out


class LinearNet(torch.nn.Module):
    """Class 1 where w·x + b > 0, else class 0.

    Under N(0, σ²I) noise, P(class 1) = Φ((w·x + b) / (σ‖w‖)), and the distance from x to the
    decision boundary is |w·x + b| / ‖w‖.
    """

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.register_buffer("w", w.flatten().to(torch.float64))
        self.b = b

    def forward(self, x):
        s = (x.flatten(1).to(torch.float64) @ self.w + self.b).to(torch.float32)
        return torch.stack([-s, s], dim=1)


def wrap(
    net: torch.nn.Module, input_shape=(1, 8, 8), num_classes: int = 10, device="cpu"
) -> TorchClassifier:
    info = ModelInfo(
        format="test", input_shape=input_shape, num_classes=num_classes, sha256="0" * 64
    )
    return TorchClassifier(net, info, device)


def constant(
    label: int = 3, num_classes: int = 10, input_shape=(1, 8, 8), device="cpu"
) -> TorchClassifier:
    return wrap(ConstantNet(label, num_classes), input_shape, num_classes, device)


def linear(w: torch.Tensor, b: float, device="cpu") -> TorchClassifier:
    return wrap(LinearNet(w, b), tuple(w.shape), 2, device)
