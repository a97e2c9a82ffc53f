"""HERO and SAM penalties: the finite-difference gradient against exact double backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsmith.methods.robust.hero import HERO, SAM


def tiny() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    batch = (torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,)))
    return model, batch


def grads(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


def test_hero_penalty_is_gamma_grad_norm_with_the_hessian_gradient() -> None:
    model, (x, y) = tiny()
    gamma = 0.5
    penalty = HERO(gamma=gamma, radius=1e-4).penalty(model, (x, y))
    loss = nn.functional.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    exact = gamma * torch.sqrt(sum(gi.pow(2).sum() for gi in g))  # gamma * ||g||, by double backward
    assert float(penalty.detach()) == pytest.approx(float(exact.detach()), rel=1e-9)
    for fd, ex in zip(grads(model, penalty), grads(model, exact), strict=True):
        assert float((fd - ex).norm() / ex.norm()) < 1e-3


def test_sam_gives_the_gradient_at_the_perturbed_point() -> None:
    model, (x, y) = tiny()
    rho = 0.05
    g = grads(model, nn.functional.cross_entropy(model(x), y))
    norm = torch.sqrt(sum(gi.pow(2).sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(model.parameters(), g, strict=True):
            p.add_(rho * gi / norm)
    moved = grads(model, nn.functional.cross_entropy(model(x), y))
    with torch.no_grad():
        for p, gi in zip(model.parameters(), g, strict=True):
            p.sub_(rho * gi / norm)
    model, _ = tiny()  # the same weights, without the rounding of the in-place round trip
    total = nn.functional.cross_entropy(model(x), y) + SAM(rho=rho).penalty(model, (x, y))
    for got, want in zip(grads(model, total), moved, strict=True):
        assert torch.allclose(got, want, atol=1e-12)


def test_extra_passes_leave_weights_and_batchnorm_statistics_as_they_were() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).train()
    batch = (torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    HERO().penalty(model, batch)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_penalty_after_the_loss_forward_keeps_its_graph_valid_in_training_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).train()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    for method in (HERO(), SAM()):
        loss = nn.functional.cross_entropy(model(x), y)  # as in fit: the loss first, then the penalty
        (loss + method.penalty(model, (x, y))).backward()
