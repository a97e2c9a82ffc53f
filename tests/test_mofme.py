"""MoFME: feature-modulated experts computing the mixture exactly with one shared fc2, starting as the FFN they
were made from, far fewer parameters than parallel experts, an MC-dropout router, and trained experts made by their
modulations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitsmith import build_method, compress, load, save
from bitsmith.methods.moe.mofme import ModulatedExperts, ParallelExperts, UncertaintyRouter
from bitsmith.zoo.restorer import FeedForward, Restorer
from bitsmith.zoo.weather import WEATHERS, psnr, weathered


def ffn(seed: int = 0, dim: int = 6, hidden: int = 10) -> FeedForward:
    torch.manual_seed(seed)
    return FeedForward(dim, hidden)


@pytest.mark.parametrize("layer", [ModulatedExperts, ParallelExperts])
def test_a_fresh_mixture_computes_the_ffn_it_was_made_from(layer: type) -> None:
    block, x = ffn(), torch.randn(3, 5, 6)
    torch.testing.assert_close(layer(block, experts=4, top_k=2).eval()(x), block(x))


def test_one_shared_fc2_computes_the_mixture_of_the_modulated_experts() -> None:
    block = ffn()
    layer = ModulatedExperts(block, experts=4, top_k=2, router="linear")
    with torch.no_grad():
        layer.gamma.normal_(1.0, 0.5)
        layer.beta.normal_(0.0, 0.5)
    x = torch.randn(7, 6)
    weights = layer.router(x)
    expected = torch.zeros(7, 6)
    for k in range(4):  # expert k: the shared block with its own modulation of the hidden activation
        expert = block.fc2(F.gelu(layer.gamma[k] * block.fc1(x) + layer.beta[k]))
        expected += weights[:, k : k + 1] * expert
    torch.testing.assert_close(layer(x), expected)
    assert ((weights > 0).sum(-1) == 2).all() and torch.allclose(weights.sum(-1), torch.ones(7))


def test_the_uncertainty_router_averages_softmaxes_over_dropout_masks() -> None:
    torch.manual_seed(1)
    router = UncertaintyRouter(6, experts=4, top_k=4, samples=3, dropout=0.5, seed=9).eval()
    x = torch.randn(5, 6)
    generator = torch.Generator().manual_seed(9)
    masks = [(torch.rand(x.shape, generator=generator) < 0.5) / 0.5 for _ in range(3)]
    expected = torch.stack([F.softmax(router.linear(x * m), -1) for m in masks]).mean(0)
    torch.testing.assert_close(router(x), expected)  # top_k = E: the averaged distribution itself
    plain = UncertaintyRouter(6, experts=4, top_k=4, samples=1)
    plain.linear = router.linear
    assert not torch.allclose(router(x), plain(x))  # averaging over masks changes the weights
    torch.testing.assert_close(plain(x), F.softmax(router.linear(x), -1))


def test_modulated_experts_hold_a_fraction_of_the_parallel_experts_parameters() -> None:
    block = ffn(dim=64, hidden=256)
    dense = sum(p.numel() for p in block.parameters())
    router = 64 * 8 + 8
    assert sum(p.numel() for p in ModulatedExperts(block, 8, 2).parameters()) == dense + 2 * 8 * 256 + router
    assert sum(p.numel() for p in ParallelExperts(block, 8, 2).parameters()) == 8 * dense + router


def toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tasks (the sign of input 0) whose targets scale a teacher FFN's hidden units differently."""
    teacher = ffn(seed=5, dim=8, hidden=16)
    scales = torch.rand(2, 16, generator=torch.Generator().manual_seed(3)) * 2
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    task = (torch.rand(n, generator=gen) < 0.5).long()
    x[:, 0] = 3.0 * (2 * task - 1)
    with torch.no_grad():
        y = teacher.fc2(F.gelu(scales[task] * teacher.fc1(x)))
    return x, y


def fitted(model: torch.nn.Module, steps: int = 400) -> float:
    x, y = toy(1024, 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        rows = slice((step * 128) % 1024, (step * 128) % 1024 + 128)
        loss = F.mse_loss(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    xt, yt = toy(512, 1)
    with torch.no_grad():
        return float(F.mse_loss(model.eval()(xt), yt))


def test_the_trained_experts_are_made_by_their_modulations() -> None:
    layer = ModulatedExperts(ffn(seed=2, dim=8, hidden=16), experts=2, top_k=2, router="linear")
    trained = fitted(layer)
    with torch.no_grad():  # the same shared block and router without the learned modulations
        layer.gamma.fill_(1.0)
        layer.beta.zero_()
    xt, yt = toy(512, 1)
    with torch.no_grad():
        assert float(F.mse_loss(layer(xt), yt)) > 2 * trained


def test_mofme_swaps_feed_forward_blocks_and_its_checkpoint_rebuilds_them(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = Restorer(width=8, blocks=2)
    images = torch.rand(4, 1, 28, 28)
    specs = compress(model, [build_method({"name": "mofme", "experts": 4})], [images])
    assert list(specs) == ["bottleneck.0.ffn", "bottleneck.1.ffn"]
    with torch.no_grad():
        model.bottleneck[0].ffn.gamma.normal_()
    save(model, tmp_path / "m.safetensors")
    again = load(tmp_path / "m.safetensors", Restorer(width=8, blocks=2))
    torch.testing.assert_close(again.eval()(images), model.eval()(images))


def test_bad_mixture_settings_are_one_line() -> None:
    with pytest.raises(ValueError, match="top_k 5 must be in 1..4"):
        build_method({"name": "mofme", "experts": 4, "top_k": 5})
    with pytest.raises(ValueError, match="not a feed-forward block"):
        compress(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                 [build_method({"name": "mofme", "where": {"types": ["Linear"]}})], [torch.rand(2, 4)])  # fmt: skip


def test_every_image_gets_at_least_one_weather_and_loses_psnr() -> None:
    clean = torch.rand(64, 1, 28, 28) * 0.5 + 0.25
    corrupted, target, present = weathered(clean, seed=0)
    assert torch.equal(target, clean) and present.shape == (64, len(WEATHERS)) and (present.sum(1) >= 1).all()
    assert (present.mean(0) > 0.3).all()  # each weather on about half the images
    assert float(psnr(corrupted, clean).mean()) < 30 and torch.equal(weathered(clean, seed=0)[0], corrupted)
