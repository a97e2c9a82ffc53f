"""CLAT: criticality, selection within the parameter budget, frozen layers, the criticality term."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsmith import build_method, compress
from bitsmith.methods.robust.clat import criticality, layer_outputs, parameter_layers
from bitsmith.train import TrainConfig, fit
from conftest import make_cnn


def data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 12, 12, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_criticality_is_the_relative_squared_change_per_example() -> None:
    clean = {"a": torch.tensor([[3.0, 4.0], [1.0, 0.0]])}
    adversarial = {"a": torch.tensor([[3.0, 5.0], [0.0, 0.0]])}
    # example 1: 1 / 25; example 2: 1 / 1
    assert torch.allclose(criticality(clean, adversarial)["a"], torch.tensor((1 / 25 + 1) / 2))


def test_selection_takes_the_most_critical_layers_within_the_budget() -> None:
    model = make_cnn()
    x, y = data()
    clat = build_method({"name": "clat", "budget": 0.3, "steps": 3, "eps": 0.2})
    compress(model, [clat], [(x, y)])
    scores = clat.scores(model, clat._images)
    layers = parameter_layers(model)
    total = sum(p.numel() for p in model.parameters())
    sizes = {n: sum(p.numel() for p in m.parameters()) for n, m in layers.items()}
    assert sum(sizes[n] for n in clat._selected) <= 0.3 * total or len(clat._selected) == 1
    best = max(scores, key=scores.get)
    assert clat._selected[0] == best  # the most critical layer always comes first
    skipped = [n for n in layers if n not in clat._selected]
    for name in skipped:  # every skipped layer is either less critical than all chosen ones or does not fit
        fits = sum(sizes[n] for n in clat._selected) + sizes[name] <= 0.3 * total
        assert not fits or scores[name] <= min(scores[n] for n in clat._selected)
    trainable = {n for n, m in layers.items() if all(p.requires_grad for p in m.parameters())}
    assert trainable == set(clat._selected)


def test_only_the_selected_layers_change_during_training() -> None:
    model = make_cnn()
    x, y = data(64)
    clat = build_method({"name": "clat", "budget": 0.2, "steps": 2})
    compress(model, [clat], [(x, y)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, x, y, TrainConfig(epochs=1, batch_size=32, optimizer="adamw", lr=1e-2), [clat])
    changed = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(clat._selected)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_the_penalty_is_the_criticality_of_the_selected_layers(lam: float) -> None:
    model = make_cnn()
    x, y = data()
    clat = build_method({"name": "clat", "budget": 0.5, "steps": 2, "lam": lam})
    compress(model, [clat], [(x, y)])
    adv, _ = clat.perturb(model, (x, y))
    with torch.no_grad():
        expected = sum(criticality(layer_outputs(model, clat._selected, x),
                                   layer_outputs(model, clat._selected, adv)).values())  # fmt: skip
    assert float(expected) > 0
    assert torch.allclose(clat.penalty(model, (adv, y)), lam * expected)


def test_bad_budget_is_refused() -> None:
    from bitsmith.recipe import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match="budget"):
        parse_recipe({"model": {"name": "cnn"}, "methods": [{"name": "clat", "budget": 0}], "train": {"epochs": 1}})
    assert nn.Module  # keeps the import used


def test_the_criticality_term_leaves_the_batch_norm_statistics_alone() -> None:
    """Only the training forward moves the running statistics; the penalty's clean and adversarial passes do not."""
    model = make_cnn().train()
    x, y = data()
    clat = build_method({"name": "clat", "budget": 0.5, "steps": 2, "lam": 1.0})
    compress(model, [clat], [(x, y)])
    model.train()
    adv, _ = clat.perturb(model, (x, y))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert float(clat.penalty(model, (adv, y))) > 0
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_critical_layers_are_reselected_every_reselect_every_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_cnn()
    x, y = data(64)
    clat = build_method({"name": "clat", "budget": 0.2, "steps": 1, "reselect_every": 1})
    compress(model, [clat], [(x, y)])
    epochs: list[int] = []
    real = type(clat).select
    monkeypatch.setattr(type(clat), "select", lambda self, m: epochs.append(1) or real(self, m))
    fit(model, x, y, TrainConfig(epochs=3, batch_size=32, optimizer="adamw", lr=1e-2), [clat])
    assert len(epochs) == 2  # after epochs 1 and 2 (not after the last)
    trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(clat._selected)
