"""NPFT: noise lands on the top-Fisher weights only, zero-mean per row, during training only; the result is the
clean base plus the merged LoRA adapters."""

from __future__ import annotations

import copy

import torch

from bitsmith import build_method, compress
from bitsmith.methods.llm.npft import outlier_mask, outlier_noise
from conftest import make_llama, token_batches
from test_llm import BLOCKS


def test_outliers_are_the_top_fisher_entries_and_their_noise_is_zero_mean_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    fisher = torch.rand(16, 64, generator=g)
    mask = outlier_mask(fisher, 2.0)  # 2 % of 1024 -> 20 entries
    assert int(mask.sum()) == 20 and fisher[mask].min() >= fisher[~mask].max()
    weight = torch.randn(16, 64, generator=g)
    noise = outlier_noise(weight, mask, g)
    assert (noise[~mask] == 0).all()
    several = mask & (mask.sum(1, keepdim=True) > 1)  # a lone outlier's zero-mean noise is 0
    assert several.any() and (noise[several] != 0).all()
    for row in range(16):
        if int(mask[row].sum()) > 1:
            values = weight[row][mask[row]]
            assert abs(float(noise[row][mask[row]].mean())) < 1e-6
            assert float(noise[row].abs().max()) <= float(values.max() - values.min()) + 1e-6


def test_the_noise_is_seen_while_training_and_gone_afterwards() -> None:
    """While training, the base weight a layer computes with differs from the clean one at the outliers only (5 %
    of its weights here); plain LoRA trains on the clean weight. With a vanishing learning rate the adapters stay
    ~0, so the result equals the original model: the clean base came back and the adapters were merged."""
    model = make_llama()
    calib = token_batches(count=2, batch=2, length=16)
    entry = {"name": "npft", "steps": 4, "rounds": 2, "lr": 1e-12, "sensitivity": 5.0, "fisher_batches": 2,
             "dropout": 0.0, "where": BLOCKS}  # fmt: skip

    def changed_entries(noise: bool) -> tuple[torch.nn.Module, list[int]]:
        copy_ = copy.deepcopy(model)
        layer = copy_.model.layers[0].mlp.down_proj
        clean = layer.weight.detach().clone()
        seen: list[int] = []
        layer.register_forward_pre_hook(
            lambda m, a: seen.append(int((m.weight != clean).sum())) if m.training else None
        )
        compress(copy_, [build_method({**entry, "noise": noise})], calib)
        return copy_, seen

    noisy, seen = changed_entries(True)
    budget = round(0.05 * model.model.layers[0].mlp.down_proj.weight.numel())
    assert seen and all(0 < n <= budget for n in seen)
    assert all(n == 0 for n in changed_entries(False)[1])
    for (name, p), q in zip(model.named_parameters(), noisy.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
    assert type(noisy.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # merged and unloaded


def test_the_noise_goes_where_the_fisher_information_is_largest(monkeypatch) -> None:  # noqa: ANN001
    """Each round's outliers are the top-``sensitivity`` % entries of that round's Fisher diagonal, layer by layer
    (not the largest weights)."""
    from bitsmith.methods.llm import npft

    fishers: list[dict[str, torch.Tensor]] = []
    masks: list[torch.Tensor] = []
    real_fisher, real_noise = npft.fisher_diagonal, npft.outlier_noise
    monkeypatch.setattr(npft, "fisher_diagonal", lambda *a: fishers.append(real_fisher(*a)) or fishers[-1])
    monkeypatch.setattr(npft, "outlier_noise", lambda w, mask, g: masks.append(mask) or real_noise(w, mask, g))
    entry = {"name": "npft", "steps": 2, "rounds": 2, "sensitivity": 2.0, "fisher_batches": 1, "where": BLOCKS}
    compress(make_llama(), [build_method(entry)], token_batches(count=2, batch=2, length=16))
    expected = [outlier_mask(f, 2.0) for round_ in fishers for f in round_.values()]
    assert len(masks) == len(expected) > 0
    assert all(torch.equal(m, e) for m, e in zip(masks, expected, strict=True))
