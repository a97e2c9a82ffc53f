"""SharpBalance: per-sample sharpness, the flattest-set exchange between members, SAM and SGD parts."""

from __future__ import annotations

import torch
from torch import nn

from bitsmith import build_method, compress
from bitsmith.methods.ensembles.sharpbalance import flattest, per_sample_sharpness, sam_sets
from conftest import make_ensemble


def batch(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 12, 12, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_per_sample_sharpness_is_each_samples_squared_gradient_norm() -> None:
    member = make_ensemble().members[0]
    x, y = batch(4)
    got = per_sample_sharpness(member, x, y)
    for k in range(4):
        grads = torch.autograd.grad(nn.functional.cross_entropy(member(x[k : k + 1]), y[k : k + 1]),
                                    list(member.parameters()))  # fmt: skip
        assert torch.allclose(got[k], sum(g.pow(2).sum() for g in grads), rtol=1e-4)


def test_flattest_keeps_the_smallest_sharpness() -> None:
    mask = flattest(torch.tensor([5.0, 1.0, 3.0, 0.5]), 0.5)
    assert mask.tolist() == [False, True, False, True]


def test_each_member_takes_sam_on_the_other_members_flattest_samples() -> None:
    flat = [torch.tensor([1, 1, 0, 0, 0, 0, 0]).bool(), torch.tensor([0, 1, 1, 0, 0, 0, 0]).bool()]
    first, second = sam_sets(flat)
    # unclaimed samples 3, 4, 5, 6: member 0 gets 3 and 5, member 1 gets 4 and 6
    assert first.tolist() == [False, True, True, True, False, True, False]  # T_1 = {1, 2}, its own T_0 \ T_1 SGD
    assert second.tolist() == [True, True, False, False, True, False, True]


def test_balanced_step_combines_sgd_gradient_at_theta_and_sam_gradient_at_theta_plus_eps() -> None:
    model = make_ensemble()
    x, y = batch()
    method = build_method({"name": "sharpbalance", "rho": 0.5, "balance_from": 0.0})
    compress(model, [method], [(x, y)])
    masks = method.sam_masks(model.members, x, y)
    member, sam = model.members[0], masks[0]
    assert 0 < int(sam.sum()) < len(y)
    reference = {n: p.detach().clone() for n, p in member.named_parameters()}
    # expected: SGD-part gradient at theta + SAM-part gradient at theta + rho g / ||g|| (weights = fractions)
    params = list(member.parameters())
    sgd = torch.autograd.grad(nn.functional.cross_entropy(member(x[~sam]), y[~sam], reduction="sum") / len(y), params)
    g = torch.autograd.grad(nn.functional.cross_entropy(member(x[sam]), y[sam]), params)
    norm = torch.sqrt(sum(t.pow(2).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(params, g, strict=True):
            p.add_(0.5 * t / norm)
    sharp = torch.autograd.grad(nn.functional.cross_entropy(member(x[sam]), y[sam], reduction="sum") / len(y), params)
    with torch.no_grad():
        for p, t in zip(params, g, strict=True):
            p.sub_(0.5 * t / norm)
    model.zero_grad()
    method.objective(model, (x, y)).backward()
    method.after_backward(model)
    for (name, p), a, b in zip(member.named_parameters(), sgd, sharp, strict=True):
        assert torch.allclose(p, reference[name], atol=1e-6)  # parameters back at theta
        assert torch.allclose(p.grad, (a + b) / 2, atol=1e-5), name  # / 2 members


def test_before_balance_every_member_trains_with_sam_on_all_samples() -> None:
    model = make_ensemble()
    x, y = batch()
    method = build_method({"name": "sharpbalance", "balance_from": 0.5})
    compress(model, [method], [(x, y)])
    assert all(bool(m.all()) for m in method.sam_masks(model.members, x, y))
    method.schedule(model, 1, 2)
    assert not any(bool(m.all()) for m in method.sam_masks(model.members, x, y))


def test_the_sam_sets_come_from_each_members_own_per_sample_sharpness() -> None:
    """After balance_from, member i's SAM samples are the other members' flattest under their measured sharpness
    (random subsets of the same size would not match)."""
    from bitsmith.methods.ensembles.sharpbalance import per_sample_sharpness

    model = make_ensemble()
    x, y = batch()
    method = build_method({"name": "sharpbalance", "rho": 0.5, "balance_from": 0.0, "flat_ratio": 0.3})
    compress(model, [method], [(x, y)])
    method.schedule(model, 0, 1)
    members = model.members
    expected = sam_sets([flattest(per_sample_sharpness(m, x, y), 0.3) for m in members])
    got = method.sam_masks(members, x, y)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert any(not bool(mask.all()) for mask in got)  # balanced: not every sample is a SAM sample
