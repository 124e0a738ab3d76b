"""The smoothed soft loss and SmoothAdv's PGD: the estimator's formula, the constraints on δ, and
that the attack does raise the loss it attacks."""

from __future__ import annotations

import math

import pytest
import torch

from smoothcert.models.architectures import build_network
from smoothcert.worker.training.attacks import (
    noisy_logits,
    pgd_l2_smoothed,
    project_l2,
    smoothed_soft_loss,
)


def test_smoothed_soft_loss_is_the_plug_in_estimator_and_stays_finite():
    logits = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0])
    naive = -torch.log(torch.softmax(logits, dim=2).mean(dim=1)[torch.arange(5), y])
    assert torch.allclose(smoothed_soft_loss(logits, y), naive, atol=1e-6)
    # Every copy gives the true class probability e^-1000: the naive formula gives inf.
    extreme = torch.zeros(1, 2, 2)
    extreme[0, :, 1] = 1000.0
    assert smoothed_soft_loss(extreme, torch.tensor([0])).item() == pytest.approx(1000.0)


def test_project_l2_scales_only_what_lies_outside_the_ball():
    delta = torch.stack(
        [torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 0.01)]
    )  # norms 2 and 0.02
    projected = project_l2(delta, 0.5)
    assert projected[0].norm().item() == pytest.approx(0.5) and torch.equal(projected[1], delta[1])


@pytest.fixture(scope="module")
def setting():
    """An untrained digits_cnn, inputs with many pixels at 0 and 1 (the box binds), fixed noise."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_network("digits_cnn", 10)
    x = torch.rand(16, 1, 8, 8, generator=generator).mul(3).sub(1).clamp(0, 1)
    y = torch.randint(0, 10, (16,), generator=generator)
    noise = 0.25 * torch.randn(16, 4, 1, 8, 8, generator=generator)
    return model, x, y, noise


@pytest.mark.parametrize("epsilon,steps", [(0.25, 1), (0.5, 2), (1.0, 5)])
def test_pgd_delta_stays_in_the_ball_and_the_box_and_raises_the_smoothed_loss(
    setting, epsilon, steps
):
    model, x, y, noise = setting
    delta = pgd_l2_smoothed(model, x, y, noise, epsilon, steps)
    assert delta.shape == x.shape and not delta.requires_grad
    assert (delta.flatten(1).norm(dim=1) <= epsilon * (1 + 1e-5)).all()
    assert ((x + delta) >= 0).all() and ((x + delta) <= 1 + 1e-6).all()
    with torch.no_grad():
        before = smoothed_soft_loss(noisy_logits(model, x, noise), y)
        after = smoothed_soft_loss(noisy_logits(model, x + delta, noise), y)
    assert (after >= before - 1e-6).float().mean() > 0.9 and after.mean() > before.mean()


def test_pgd_steps_of_two_epsilon_over_t_reach_the_boundary(setting):
    # Interior inputs (no box clipping) and one step of size 2ε: the step overshoots the ball and
    # is projected back onto it, so every δ has norm exactly ε along the normalised gradient.
    model, _, y, noise = setting
    x = torch.full((16, 1, 8, 8), 0.5)
    delta = pgd_l2_smoothed(model, x, y, noise, 0.1, 1)
    assert torch.allclose(delta.flatten(1).norm(dim=1), torch.full((16,), 0.1), rtol=1e-5)


def test_pgd_leaves_the_model_as_it_found_it(setting):
    model, x, y, noise = setting
    model.train()
    pgd_l2_smoothed(model, x, y, noise, 0.5, 2)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert torch.equal(pgd_l2_smoothed(model, x, y, noise, 0.0, 2), torch.zeros_like(x))


def test_noisy_logits_shares_each_input_across_its_m_copies():
    model = torch.nn.Flatten()
    x = torch.arange(2 * 4, dtype=torch.float32).view(2, 1, 2, 2)
    noise = torch.zeros(2, 3, 1, 2, 2)
    noise[:, 1] += 10
    out = noisy_logits(model, x, noise)
    assert out.shape == (2, 3, 4) and torch.equal(out[1, 1], x[1].flatten() + 10)
    assert math.isclose(float(out[0, 0, 0]), 0.0)
