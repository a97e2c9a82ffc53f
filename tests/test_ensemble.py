"""Ensemble (one model, one checkpoint), the deep-ensemble baseline, DVERGE and the diversity metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bitsmith import Ensemble, build_method, compress, load, save
from bitsmith.methods.ensembles.dverge import distill, feature_layers, features
from bitsmith.robust import AttackSpec
from bitsmith.robust.diversity import disagreement, transferability
from conftest import TinyCNN, make_cnn, make_ensemble
from test_recipe_cli import needs_data


def batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 12, 12, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_ensemble_averages_member_probabilities() -> None:
    model = make_ensemble(members=3)
    x, _ = batch()
    mean = torch.stack([torch.softmax(m(x), -1) for m in model.members]).mean(0)
    assert torch.allclose(model(x).exp(), mean, atol=1e-6)


def test_ensemble_refuses_members_that_disagree_on_shapes() -> None:
    example = torch.zeros(1, 1, 12, 12)
    with pytest.raises(ValueError, match="member 1 outputs shape"):
        Ensemble([TinyCNN(), TinyCNN(classes=5)], example)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(100, 10))
    with pytest.raises(ValueError, match="member 1 does not accept inputs of shape"):
        Ensemble([TinyCNN(), flat], example)
    with pytest.raises(ValueError, match="at least 2 members"):
        Ensemble([TinyCNN()], example)


def test_members_compressed_differently_save_and_load_as_one_checkpoint(tmp_path: Path) -> None:
    model = make_ensemble()
    x, y = batch()
    ptq = build_method({"name": "ptq", "w_bits": 4, "a_bits": None, "where": {"include": ["members.0.*"]}})
    layers = compress(model, [ptq], [(x, y)])
    assert layers and all(name.startswith("members.0.") for name in layers)
    reloaded = load(save(model, tmp_path / "ensemble.safetensors"), make_ensemble())
    assert torch.equal(reloaded(x), model(x))


def test_deep_ensemble_trains_each_member_on_its_own_loss() -> None:
    model = make_ensemble().train()
    x, y = batch()
    loss = build_method({"name": "ensemble"}).objective(model, (x, y))
    loss.backward()
    for member in model.members:  # each member's gradient is exactly the one it gets trained alone
        together = [p.grad.clone() for p in member.parameters()]
        member.zero_grad()
        nn.functional.cross_entropy(member(x), y).backward()
        assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(together, member.parameters(), strict=True))


def test_distillation_moves_features_toward_the_target_inside_the_ball() -> None:
    member = make_cnn()
    layer = feature_layers(member)[1]
    source, _ = batch(seed=1)
    target, _ = batch(seed=2)
    out = distill(member, layer, source, target, eps=0.07, step_size=0.01, steps=10)
    assert float((out - source).abs().max()) <= 0.07 + 1e-6 and out.min() >= 0 and out.max() <= 1
    with torch.no_grad():
        goal = features(member, layer, target)
        before = (features(member, layer, source) - goal).pow(2).sum()
        after = (features(member, layer, out) - goal).pow(2).sum()
    assert after < 0.9 * before


def test_dverge_trains_each_member_on_the_other_members_distilled_images() -> None:
    """The objective is sum_i sum_{j != i} CE(f_i(x'_j), y) with x'_j distilled on member j (not on i)."""
    model = make_ensemble(members=3)
    with torch.no_grad():  # confident members (random ones output near-uniform logits on any image)
        for param in model.parameters():
            param.mul_(3.0)
    x, y = batch()
    dverge = build_method({"name": "dverge", "steps": 3, "layer": 1})
    dverge.prepare(model)
    loss = dverge.objective(model, (x, y))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(dverge.seed * 7919 + len(y)))
    distilled = [distill(m, feature_layers(m)[1], x, x[order], 0.07, 0.007, 3) for m in model.members]
    expected = sum(nn.functional.cross_entropy(model.members[i](distilled[j]), y)
                   for i in range(3) for j in range(3) if i != j)  # fmt: skip
    assert torch.allclose(loss, expected, atol=1e-5)
    own = sum(nn.functional.cross_entropy(model.members[i](distilled[i]), y) for i in range(3))
    assert not torch.allclose(2 * own, expected, atol=1e-4)  # the check tells own images from the others'


def test_dverge_redraws_its_layer_each_epoch_and_refuses_a_missing_one() -> None:
    model = make_ensemble()
    dverge = build_method({"name": "dverge"})
    dverge.prepare(model)
    drawn = set()
    for epoch in range(1, 12):
        dverge.schedule(model, epoch, 12)
        drawn.add(dverge._layer)
    assert len(drawn) > 1 and max(drawn) < len(feature_layers(model.members[0]))
    with pytest.raises(ValueError, match="dverge.layer: 9 is out of range"):
        build_method({"name": "dverge", "layer": 9}).prepare(model)
    with pytest.raises(ValueError, match="trains an ensemble"):
        build_method({"name": "dverge"}).prepare(make_cnn())


@needs_data
def test_transferability_matrix_and_disagreement() -> None:
    from test_robust import fashion, trained

    members = [trained(), trained("adv-train")]
    _, _, x, y = fashion()
    x, y = x[:300], y[:300]
    matrix = transferability(members, x, y, AttackSpec(eps=0.1, steps=10))
    assert matrix.shape == (2, 2)
    assert matrix[0, 0] > 0.9 and matrix[1, 1] < 0.7  # white-box: the plain member breaks, the robust one less
    assert matrix[0, 1] < matrix[0, 0]  # examples transfer less than they hit their own source
    assert disagreement([members[0], members[0]], x) == 0.0
    assert 0 < disagreement(members, x) <= 1


def test_distillation_momentum_is_per_image_and_accumulates() -> None:
    """MI-FGSM as DVERGE runs it: each image's gradient normalised by its own L1 norm (a batch distils exactly as
    its images one by one), and the momentum carries earlier steps (mu = 1 differs from mu = 0)."""
    member = make_cnn()
    layer = feature_layers(member)[1]
    source, _ = batch(seed=1)
    target, _ = batch(seed=2)
    settings = {"eps": 0.07, "step_size": 0.01, "steps": 6}
    together = distill(member, layer, source[:4], target[:4], **settings)
    alone = torch.cat([distill(member, layer, source[i : i + 1], target[i : i + 1], **settings) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-6)
    without = distill(member, layer, source[:4], target[:4], mu=0.0, **settings)
    assert (together != without).float().mean() > 0.05
