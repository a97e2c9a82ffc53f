"""HCE: the non-target diversity term and the joint objective of heterogeneously compressed members."""

from __future__ import annotations

import math

import torch
from torch import nn

from bitsmith import build_method, compress
from bitsmith.methods.ensembles.hce import js_divergence, non_target_distributions, non_target_diversity
from conftest import make_ensemble


def test_non_target_distributions_ignore_the_true_class() -> None:
    logits = torch.tensor([[[5.0, 1.0, 2.0]], [[-9.0, 1.0, 2.0]]])  # two members, one example of class 0
    dists = non_target_distributions(logits, torch.tensor([0]))
    assert torch.allclose(dists[0], dists[1])  # they differ only on the true class
    assert non_target_diversity(logits, torch.tensor([0])) == 0
    assert non_target_diversity(logits, torch.tensor([1])) > 0.1


def test_js_divergence_bounds() -> None:
    p, q = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(js_divergence(p, q), torch.tensor([math.log(2)]))
    assert torch.allclose(js_divergence(p, p), torch.zeros(1))


def test_hce_objective_rewards_non_target_diversity_on_pruned_and_quantized_members() -> None:
    model = make_ensemble()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 12, 12, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    compress(model, [build_method({"name": "prune", "sparsity": 0.5, "where": {"include": ["members.0.*"]}}),
                     build_method({"name": "qat", "w_bits": 4, "a_bits": None, "where": {"include": ["members.1.*"]}})],
             [(x, y)])  # fmt: skip
    hce = build_method({"name": "hce", "lam": 0.5, "mu": 0.3})
    loss = hce.objective(model, (x, y))
    logits = model.member_logits(x)
    own = sum(nn.functional.cross_entropy(m, y) for m in logits) / 2
    ensemble = nn.functional.nll_loss(model(x), y)
    assert torch.allclose(loss, own + 0.5 * ensemble - 0.3 * non_target_diversity(logits, y), atol=1e-6)
    assert non_target_diversity(logits, y) > 0
