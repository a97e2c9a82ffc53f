"""T-REX: the adapter adds sigmoid(100 g) B R(x)^T A x with a per-token routing matrix R(x) over r1 x r2 rank-one
experts, mixes in the semantic prior, starts as the frozen base layer and trains only its own parameters."""

from __future__ import annotations

import pytest
import torch

from bitsmith import build_method, compress
from bitsmith.methods.moe.trex import TRexLinear, intuition_prior, semantic_prior, trex_layers


def randomized(layer: TRexLinear, seed: int = 0) -> TRexLinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.B, layer.router):
            p.copy_(torch.randn(p.shape, generator=g))
        layer.gate.fill_(0.01)
    return layer


def test_starts_as_the_base_layer() -> None:
    base = torch.nn.Linear(8, 6)
    layer = TRexLinear(base, 3, 2)
    x = torch.randn(4, 5, 8)
    assert torch.equal(layer(x), base(x))
    assert layer.adapter_parameters() == 3 * 8 + 6 * 2 + 6 * 8 + 2


def test_each_token_mixes_its_own_rank_one_experts() -> None:
    layer = randomized(TRexLinear(torch.nn.Linear(8, 6), 3, 2)).eval()
    x = torch.randn(2, 4, 8)
    out = layer(x) - layer.base(x)
    w = torch.sigmoid(100 * layer.omega)
    for b in range(2):
        for t in range(4):
            token = x[b, t]
            routing = (32 * w * torch.softmax(layer.router @ token, -1) + 4 * (1 - w) / 6).reshape(3, 2)
            expected = torch.sigmoid(100 * layer.gate) * layer.B @ (routing.T @ (layer.A @ token))
            assert torch.allclose(out[b, t], expected, atol=1e-5)
    routings = layer.routing(x).reshape(8, 6)
    assert not torch.allclose(routings[0], routings[1])  # routed per token


def test_the_semantic_prior_steers_the_mixture() -> None:
    layer = randomized(TRexLinear(torch.nn.Linear(8, 6), 3, 2)).eval()
    with torch.no_grad():
        layer.omega.fill_(-1.0)  # w = sigmoid(-100) ~ 0: the prior term alone
    x = torch.randn(2, 4, 8)
    one_hot = torch.zeros(2, 6)
    one_hot[0, 0], one_hot[1, 5] = 1, 1
    with semantic_prior(one_hot):
        routing = layer.routing(x)
    assert torch.allclose(routing[0, 0], torch.tensor([[4.0, 0], [0, 0], [0, 0]]), atol=1e-4)
    assert torch.allclose(routing[1, 3], torch.tensor([[0, 0], [0, 0], [0, 4.0]]), atol=1e-4)
    with semantic_prior(torch.full((2, 5), 0.2)), pytest.raises(ValueError, match="5 entries; this layer has 6"):
        layer(x)


def test_intuition_prior_prefers_the_nearest_centroid() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4, 16) * 5
    points = torch.cat([c + 0.1 * torch.randn(20, 16, generator=g) for c in centers])
    centroids, prior = intuition_prior(points, 4)
    p = prior(centers)
    assert torch.allclose(p.sum(-1), torch.ones(4)) and p.argmax(-1).unique().numel() == 4


def test_method_trains_only_the_adapters_and_fits_a_target() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    method = build_method({"name": "t-rex", "r1": 2, "r2": 2})
    compress(model, [method])
    layers = trex_layers(model)
    assert len(layers) == 2
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".base." not in n for n in trainable)
    x, target = torch.randn(64, 8), torch.randn(64, 4)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]


def test_rank_zero_is_refused_with_the_range() -> None:
    with pytest.raises(ValueError, match=r"r1 \(an adapter rank\) must be >= 1; got 0"):
        build_method({"name": "t-rex", "r1": 0})
