"""Structured ViT units (``bitsmith.structure``) and the NViT method on a tiny ViT."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bitsmith import compress
from bitsmith.methods.sparse.nvit import NViT
from bitsmith.structure import EMB, dims, macs, remove_units, shrink_to, structure_counts, unit_sums
from bitsmith.train import TrainConfig, fit
from bitsmith.zoo.vision import ResNetCNN, ViT


def tiny_vit() -> ViT:
    torch.manual_seed(0)
    model = ViT(patch=7, dim=16, depth=2, heads=2, mlp_dim=32).eval()
    with torch.no_grad():  # non-zero biases, so dropped biases show up in the comparisons
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def images(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def zero_unit(model: ViT, kind: str, block: int, index: int) -> None:
    """Zero every parameter entry of one unit (what removal takes away)."""
    b = model.blocks[block]
    h, qk, dv = b.attn.heads, b.attn.qk_dim, b.attn.v_dim
    w, bias = b.attn.qkv.weight.data, b.attn.qkv.bias.data
    with torch.no_grad():
        if kind == "mlp":
            b.fc1.weight[index] = 0
            b.fc1.bias[index] = 0
            b.fc2.weight[:, index] = 0
            return
        q_rows = {"heads": [index * qk + j for j in range(qk)], "qk": [hh * qk + index for hh in range(h)]}.get(
            kind, []
        )
        v_rows = {"heads": [index * dv + j for j in range(dv)], "v": [hh * dv + index for hh in range(h)]}.get(kind, [])
        for rows in (q_rows, [r + h * qk for r in q_rows], [r + 2 * h * qk for r in v_rows]):
            w[rows], bias[rows] = 0, 0
        b.attn.proj.weight[:, v_rows] = 0


@pytest.mark.parametrize("kind,index", [("mlp", 5), ("heads", 1), ("qk", 3), ("v", 2)])
def test_removing_a_unit_equals_zeroing_its_parameters(kind: str, index: int) -> None:
    model = tiny_vit()
    zeroed = copy.deepcopy(model)
    zero_unit(zeroed, kind, 1, index)
    keep = torch.ones(dims(model)[(kind, 1)], dtype=torch.bool)
    keep[index] = False
    remove_units(model, {(kind, 1): keep})
    assert dims(model)[(kind, 1)] == keep.numel() - 1
    torch.testing.assert_close(model(images()), zeroed(images()), rtol=1e-5, atol=1e-5)


def test_keeping_everything_changes_nothing_and_emb_removal_shrinks_every_layer() -> None:
    model = tiny_vit()
    before = model(images())
    remove_units(model, {})
    torch.testing.assert_close(model(images()), before)
    keep = torch.ones(16, dtype=torch.bool)
    keep[[0, 7]] = False
    remove_units(model, {EMB: keep})
    assert model.blocks[0].attn.qkv.in_features == 14 and model.head.in_features == 14
    assert model(images()).shape == (8, 10)


def test_unit_sums_count_each_units_parameters() -> None:
    model = tiny_vit()
    counts = unit_sums(model, torch.ones_like)
    dim, qk, v, heads, mlp = 16, 8, 8, 2, 32
    assert torch.all(counts[("mlp", 0)] == 2 * dim + 1)
    assert torch.all(counts[("heads", 0)] == (2 * qk + v) * (dim + 1) + v * dim)
    assert torch.all(counts[("qk", 0)] == 2 * heads * (dim + 1))
    assert torch.all(counts[("v", 0)] == heads * (dim + 1) + heads * dim)
    tokens, depth = 17, 2
    per_block = 2 + (2 * qk + v) * heads + v * heads + 1 + 2 + mlp + mlp + 1  # norm1, qkv, proj, norm2, fc1, fc2
    assert torch.all(counts[EMB] == 49 + 1 + tokens + 1 + depth * per_block + 2 + 10)


def test_macs_match_torch_flop_counter() -> None:
    model = tiny_vit()
    keep = torch.ones(8, dtype=torch.bool)
    keep[:3] = False
    remove_units(model, {("qk", 0): keep, ("mlp", 1): torch.arange(32) < 20})
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # the counter sees its bmm
        model(images(1))
    assert macs(model) == pytest.approx(counter.get_total_flops() / 2, rel=0.01)


def test_nvit_one_shot_meets_the_macs_target_and_reloads_by_structure() -> None:
    model = tiny_vit()
    full = macs(model)
    method = NViT(macs_target=0.6, min_units={"emb": 8, "heads": 1, "qk": 2, "v": 2, "mlp": 4})
    compress(model, method, [images(16)])
    assert macs(model) <= 0.6 * full
    assert all(n >= 1 for n in dims(model).values())
    fresh = shrink_to(ViT(patch=7, dim=16, depth=2, heads=2, mlp_dim=32), structure_counts(model))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(images()), model(images()))


@pytest.mark.parametrize("criterion", ["taylor", "magnitude", "uniform"])
def test_nvit_prunes_while_training(criterion: str) -> None:
    model = tiny_vit()
    full = macs(model)
    method = NViT(macs_target=0.7, criterion=criterion, per_step=4, interval=2)
    x = torch.rand(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    compress(model, method, [x[:16]], finalize=False)
    fit(model, x, y, TrainConfig(epochs=3, batch_size=8, optimizer="adamw", lr=1e-3), [method])
    assert method.done and macs(model) <= 0.7 * full
    counts = dims(model)
    assert all(counts[("qk", i)] == counts[("v", i)] for i in range(2))  # tied: the fused attention kernel runs
    if criterion == "uniform":  # every block keeps the same widths
        assert counts[("mlp", 0)] == counts[("mlp", 1)] and counts[("qk", 0)] == counts[("qk", 1)]


def test_nvit_names_what_a_non_vit_lacks() -> None:
    with pytest.raises(ValueError, match="patch_embed"):
        compress(ResNetCNN(), NViT(), [images()])


def test_an_interrupted_nvit_run_resumes_with_the_pruned_widths(tmp_path) -> None:
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    config = TrainConfig(epochs=2, batch_size=8, optimizer="adamw", lr=1e-3)

    def start() -> tuple[ViT, NViT]:
        method = NViT(macs_target=0.6, per_step=12, interval=2, min_units={"emb": 8, "qk": 2, "mlp": 4})
        model = tiny_vit()
        compress(model, method, [x[:16]], finalize=False)
        return model, method

    model, method = start()
    fit(model, x, y, TrainConfig(**{**config.__dict__, "epochs": 1}), [method], checkpoint=tmp_path / "state.pt")
    pruned = structure_counts(model)
    resumed, method = start()  # a new process: fresh model and method, the state file on disk
    fit(resumed, x, y, config, [method], checkpoint=tmp_path / "state.pt")
    assert all(structure_counts(resumed)[k] <= n for k, n in pruned.items())
    assert method.done and macs(resumed) <= 0.6 * macs(tiny_vit())


def test_the_lowest_scoring_units_are_the_ones_removed() -> None:
    model = tiny_vit()
    method = NViT(macs_target=0.1, structures=["mlp"], min_units={"mlp": 4})
    compress(model, method, [images(16)], finalize=False)
    fc1 = model.blocks[1].fc1.weight.detach().clone()
    low = [3, 7, 11, 30]  # block 1's MLP neurons with the lowest saliency
    method._ema = {key: torch.full_like(score, 1e3) for key, score in method._ema.items()}
    method._ema[("mlp", 1)][low] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    method.prune_step(model, 4)
    keep = [i for i in range(32) if i not in low]
    assert dims(model)[("mlp", 1)] == 28 and dims(model)[("mlp", 0)] == 32
    assert torch.equal(model.blocks[1].fc1.weight, fc1[keep])


def test_taylor_saliency_is_the_squared_sum_of_weight_times_gradient() -> None:
    model = tiny_vit()
    method = NViT(criterion="taylor")
    x = images(16)
    labels = torch.arange(16) % 10
    compress(model, method, [(x, labels)], finalize=False)
    reference = tiny_vit()
    torch.nn.functional.cross_entropy(reference(x), labels).backward()
    expected = unit_sums(reference, lambda p: p * p.grad)
    for key, score in method._ema.items():
        value = expected[key].pow(2)
        value = value / len(model.blocks) if key == EMB else value / 2 if key[0] == "qk" else value
        torch.testing.assert_close(score, value, rtol=1e-4, atol=1e-12)
