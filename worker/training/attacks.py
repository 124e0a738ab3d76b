"""The smoothed soft classifier's loss and the ℓ₂ PGD attack on it (Salman et al., 2019).

With m Gaussian noise samples ηᵢ, the smoothed soft classifier G(x)_y ≈ (1/m) Σᵢ softmax(f(x+ηᵢ))_y
is the plug-in estimate of E_η[softmax(f(x+η))_y], and its loss is −log G(x)_y.
SmoothAdv attacks that loss: one perturbation δ per input, shared by its m noisy copies,
found by T steps of normalised-gradient ascent of size 2ε/T, each followed by projection onto
the [0,1] box (x+δ stays an image) and then onto the ℓ₂ ball of radius ε. Scaling δ towards 0
keeps x+δ inside the box, so after the two projections δ satisfies both constraints.

ε is in [0,1]-pixel ℓ₂ units: Salman et al.'s ``--epsilon 64`` (divided by 256 in their code)
is ε = 0.25 here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def smoothed_soft_loss(logits: Tensor, y: Tensor) -> Tensor:
    """−log((1/m) Σᵢ softmax(logitsᵢ)_y) per input, for logits (B, m, K) and labels (B,).

    Computed as log m − logsumexp over i of log_softmax(logitsᵢ)_y, which does not underflow
    when every copy gives the true class a tiny probability.
    """
    m = logits.shape[1]
    log_p = torch.log_softmax(logits, dim=2)
    log_p_true = log_p.gather(2, y.view(-1, 1, 1).expand(-1, m, 1)).squeeze(2)  # (B, m)
    return math.log(m) - torch.logsumexp(log_p_true, dim=1)


def noisy_logits(model: nn.Module, x: Tensor, noise: Tensor) -> Tensor:
    """Logits (B, m, K) of the m noisy copies x + noise[:, i] of each input; noise is (B, m, C, H, W)."""
    batch, m = noise.shape[:2]
    return model((x.unsqueeze(1) + noise).flatten(0, 1)).view(batch, m, -1)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients inside, the model's previous state restored after."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def pgd_l2_smoothed(
    model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, epsilon: float, steps: int
) -> Tensor:
    """SmoothAdv's perturbation δ (B, C, H, W) for inputs x in [0,1] and fixed noise (B, m, C, H, W).

    Each of the ``steps`` steps raises :func:`smoothed_soft_loss` of the m copies x+δ+ηᵢ along
    its per-example normalised gradient by 2·epsilon/steps, then projects: x+δ into [0,1], then
    ‖δ‖₂ ≤ epsilon. Starts from δ = 0. The model runs in eval mode without parameter gradients
    and is left as it was. Returns δ detached; epsilon = 0 gives zeros.
    """
    delta = torch.zeros_like(x)
    if epsilon <= 0:
        return delta
    step = 2.0 * epsilon / steps
    with frozen(model):
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = smoothed_soft_loss(noisy_logits(model, x + delta, noise), y).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                delta = delta.detach() + step * grad / norms
                delta = (x + delta).clamp_(0.0, 1.0) - x
                delta = project_l2(delta, epsilon)
    return delta.detach()


def project_l2(delta: Tensor, epsilon: float) -> Tensor:
    """δ scaled, per example, onto the ℓ₂ ball of radius epsilon (unchanged inside it)."""
    norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return delta * torch.clamp(epsilon / norms.clamp_min(1e-12), max=1.0)
