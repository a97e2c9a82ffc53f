"""Split-Ensemble: subtask targets with an OOD class, per-branch calibrated outputs, class grouping, OOD AUROC."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsmith import SplitEnsemble, build_method, compress
from bitsmith.eval.cost import model_cost
from bitsmith.robust.ood import auroc, corrupt, ood_auroc
from bitsmith.split_ensemble import class_groups
from bitsmith.zoo.vision import ResNetCNN, split_cnn

GROUPS = [[0, 2], [1, 3, 4]]


def tiny(seed: int = 0) -> SplitEnsemble:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
    return SplitEnsemble(trunk, [nn.Linear(8, len(g) + 1) for g in GROUPS], GROUPS)


def test_each_class_scores_its_branch_probability_with_the_ood_class_in_the_softmax() -> None:
    model, x = tiny(), torch.rand(6, 1, 4, 4)
    out = model(x)
    for logits, group in zip(model.branch_logits(x), GROUPS, strict=True):
        probs = torch.softmax(logits, dim=-1)  # over the group's classes and its OOD class
        assert torch.allclose(out[:, group].exp(), probs[:, : len(group)], atol=1e-6)
    assert torch.allclose(model.ood_score(x), out.exp().max(1).values)


def test_other_groups_samples_are_the_ood_class_of_a_branch() -> None:
    model = tiny()
    y = torch.tensor([0, 1, 2, 3, 4])
    assert model.local_targets(y, 0).tolist() == [0, 2, 1, 2, 2]
    assert model.local_targets(y, 1).tolist() == [3, 0, 3, 1, 2]


def test_objective_is_the_mean_class_weighted_subtask_loss() -> None:
    model, x, y = tiny(), torch.rand(10, 1, 4, 4), torch.arange(10) % 5
    method = build_method({"name": "split-ensemble"})
    compress(model, [method], [(x, y)])
    expected = 0.0
    for m, logits in enumerate(model.branch_logits(x)):
        size = len(GROUPS[m])
        targets = torch.tensor([GROUPS[m].index(c) if c in GROUPS[m] else size for c in y.tolist()])
        weight = torch.ones(size + 1)
        weight[-1] = 1 / (5 - size)
        expected = expected + nn.functional.cross_entropy(logits, targets, weight=weight)
    assert torch.allclose(method.objective(model, (x, y)), expected / 2)


def test_training_teaches_a_branch_to_reject_the_other_groups_samples() -> None:
    """After training, images of group 1's classes get a low in-distribution probability from branch 0."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=gen) * 2
    y = torch.arange(200) % 5
    x = (centres[y] + 0.3 * torch.randn(200, 16, generator=gen)).view(200, 1, 4, 4)
    model, method = tiny(), build_method({"name": "split-ensemble"})
    compress(model, [method], [(x, y)])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        method.objective(model, (x, y)).backward()
        optimizer.step()
    with torch.no_grad():
        ood_prob = torch.softmax(model.branch_logits(x)[0], -1)[:, -1]
    others = torch.isin(y, torch.tensor(GROUPS[1]))
    assert ood_prob[others].mean() > 0.9 and ood_prob[~others].mean() < 0.1
    assert (model(x).argmax(1) == y).float().mean() > 0.95


def test_split_ensemble_refuses_groups_that_do_not_partition_the_classes() -> None:
    trunk = nn.Flatten()
    with pytest.raises(ValueError, match="partition"):
        SplitEnsemble(trunk, [nn.Linear(16, 3), nn.Linear(16, 3)], [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="one branch per group"):
        SplitEnsemble(trunk, [nn.Linear(16, 3)], [[0, 1], [2]])
    with pytest.raises(ValueError, match="SplitEnsemble"):
        compress(ResNetCNN(), [build_method({"name": "split-ensemble"})], [])


def test_classes_with_similar_features_are_grouped() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0, 0], [5.0, 0.5, 0], [0, 0, 5.0], [0, 0.5, 5.0], [0, 5.0, 0]])
    y = torch.arange(100) % 5
    features = centres[y] + 0.1 * torch.randn(100, 3, generator=gen)
    assert class_groups(features, y, 3) == [[0, 1], [2, 3], [4]]


def test_split_cnn_stays_within_the_single_cnns_macs() -> None:
    model = split_cnn([[0, 2, 4, 6], [1, 3, 8], [5, 7, 9]])
    example = torch.zeros(1, 1, 28, 28)
    assert model_cost(model, example).totals["macs"] <= model_cost(ResNetCNN(), example).totals["macs"]
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_auroc_and_msp_scores() -> None:
    assert auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2])) == 1.0
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.9, 0.8])) == 0.0
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([0.5])) == 0.5
    plain = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    x = torch.rand(8, 1, 4, 4)
    assert 0.0 <= ood_auroc(plain, x, corrupt(x, "invert")) <= 1.0
    assert torch.equal(corrupt(x, "invert"), 1 - x)
    with pytest.raises(ValueError, match="unknown kind"):
        corrupt(x, "fog")


def test_zoo_structures_rebuild_from_what_a_checkpoint_records() -> None:
    from bitsmith import Ensemble
    from bitsmith.zoo import build_structure, structure_of

    for structure in ({}, {"members": 3}, {"split": [[0, 2, 4, 6], [1, 3, 8], [5, 7, 9]]}):
        model = build_structure("cnn", structure)
        assert structure_of(model) == structure
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    members = build_structure("cnn", {"members": 2}).members
    assert isinstance(build_structure("cnn", {"members": 2}), Ensemble)
    assert not torch.equal(members[0].fc.weight, members[1].fc.weight)  # seeded differently
    with pytest.raises(ValueError, match="2..16"):
        build_structure("cnn", {"members": 40})
