"""SAM as two hooks (bitsmith.sam) and SAFER's sharpest-layer selection."""

from __future__ import annotations

import torch
from torch import nn

from bitsmith import build_method, compress
from bitsmith.methods.robust.clat import parameter_layers
from bitsmith.sam import SharpnessStep
from conftest import make_vit


def data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 12, 12, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_sam_gradient_is_taken_at_the_ascended_point_and_the_weights_return() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    theta = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    shifted = nn.Linear(4, 3)
    with torch.no_grad():
        for p, t, g in zip(shifted.parameters(), theta, grads, strict=True):
            p.copy_(t + 0.5 * g / norm)
    expected = torch.autograd.grad(nn.functional.cross_entropy(shifted(x), y), list(shifted.parameters()))

    step = SharpnessStep(rho=0.5)
    step.ascend(list(model.parameters()), nn.functional.cross_entropy(model(x), y))
    nn.functional.cross_entropy(model(x), y).backward()
    step.descend_back()
    for p, t, e in zip(model.parameters(), theta, expected, strict=True):
        assert torch.allclose(p, t, atol=1e-6) and torch.allclose(p.grad, e, atol=1e-6)


def test_safer_trains_only_the_sharpest_layers() -> None:
    model = make_vit()
    x, y = data()
    safer = build_method({"name": "safer", "layers": 2, "steps": 2, "eps": 0.1})
    compress(model, [safer], [(x, y)])
    scores = safer.sharpness(model, x)
    assert safer._selected == sorted(scores, key=scores.get, reverse=True)[:2]
    layers = parameter_layers(model)
    trainable = {n for n, m in layers.items() if any(p.requires_grad for p in m.parameters())}
    assert trainable == set(safer._selected)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in trainable)


def test_safer_step_uses_the_sam_gradient_and_restores_the_weights() -> None:
    model = make_vit()
    x, y = data()
    safer = build_method({"name": "safer", "layers": 1, "steps": 1, "rho": 0.5})
    compress(model, [safer], [(x, y)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adv, _ = safer.perturb(model, (x, y))
    loss = safer.objective(model, (adv, y))
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all(n.rsplit(".", 1)[0] in safer._selected for n in moved)  # ascended: only selected layers
    loss.backward()
    safer.after_backward(model)
    for n, p in model.named_parameters():
        assert torch.allclose(p, before[n], atol=1e-6), n
