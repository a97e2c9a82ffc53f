"""QAT baselines: STE and LSQ train through their quantizers, end on the grid and round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitsmith import compress, load, save
from bitsmith.methods.qat.qat import QAT
from bitsmith.quant.bnfold import BatchNormFolded, conv_bn_pairs
from bitsmith.train import TrainConfig, accuracy, fit
from conftest import make_cnn


def toy_data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(n, 1, 12, 12, generator=gen), torch.randint(0, 2, (n,), generator=gen)
    x[y == 1, :, :6] += 0.5  # class 1: a brighter top half
    return x, y


@pytest.mark.parametrize("step", ["ste", "lsq"])
def test_qat_trains_through_the_quantizers_and_stays_on_the_grid(step: str, tmp_path: Path) -> None:
    model = make_cnn()
    x, y = toy_data(512)
    method = QAT(w_bits=3, a_bits=8, step=step)
    compress(model, method, [x[:64]], finalize=False)
    assert isinstance(model.stem.weight_q, BatchNormFolded)  # stem -> bn is folded while training
    assert model.stem.input_q.symmetric is False  # images are non-negative: unsigned codes
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("scale")}
    assert (len(before) > 0) == (step == "lsq")
    fit(model, x, y, TrainConfig(epochs=6, batch_size=32, optimizer="adamw", lr=1e-2, weight_decay=0), [method])
    for name, value in before.items():  # LSQ learned its steps
        assert not torch.equal(value, dict(model.named_parameters())[name]), name
    method.finalize(model)
    assert accuracy(model, x, y) > 0.9
    weight = model.fc1.effective_weight().detach()
    assert all(len(row.unique()) <= 8 for row in weight)  # 3 bits per output channel
    reloaded = load(save(model, tmp_path / "qat.safetensors"), make_cnn())
    assert torch.equal(reloaded(x[:8]), model.eval()(x[:8]))


def test_batchnorm_folding_is_exact_once_the_statistics_are_frozen() -> None:
    model = make_cnn()
    assert conv_bn_pairs(model, ["stem", "conv"]) == {"stem": "bn"}  # conv feeds a ReLU, not a BN
    x, y = toy_data(128)
    method = QAT(w_bits=4, a_bits=None, step="lsq")
    compress(model, method, [x[:64]], finalize=False)
    fit(model, x, y, TrainConfig(epochs=3, batch_size=32, optimizer="adamw", lr=1e-2, weight_decay=0), [method])
    frozen = model.bn.running_mean.clone()
    model.train()(x[:32])  # frozen after round(0.7 * 3) = 2 epochs: training mode leaves the statistics alone
    assert torch.equal(model.bn.running_mean, frozen)
    before = model.eval()(x)
    method.finalize(model)
    assert not isinstance(model.stem.weight_q, BatchNormFolded)
    assert torch.allclose(model(x), before, atol=1e-5)
    weight = model.stem.effective_weight().detach()  # the folded weight itself is on a 4-bit grid
    assert all(len(row.unique()) <= 16 for row in weight)
    assert torch.allclose(model.bn(torch.zeros(1, 8, 2, 2)).mean((0, 2, 3)), model.bn.bias.detach())


def test_batchnorm_folding_can_be_turned_off() -> None:
    model = make_cnn()
    compress(model, QAT(w_bits=4, a_bits=None, fold_bn=False), [toy_data(64)[0]], finalize=False)
    assert not isinstance(model.stem.weight_q, BatchNormFolded)


def test_batchnorm_pairs_are_found_after_another_method_swapped_the_layers() -> None:
    from bitsmith.methods.qat.bsq import BSQ

    model = make_cnn()
    x = toy_data(64)[0]
    compress(
        model, [BSQ(where={"exclude": ["@first"]}), QAT(w_bits=8, where={"include": ["@first"]})], [x], finalize=False
    )
    assert isinstance(model.stem.weight_q, BatchNormFolded)


def test_lsq_learns_the_weight_steps_and_ste_computes_them() -> None:
    x, _ = toy_data(64)
    model, method = make_cnn(), QAT(w_bits=4, a_bits=8, step="lsq", fold_bn=False)
    compress(model, method, [x[:16]], finalize=False)
    steps = [p for n, p in model.named_parameters() if "weight_q" in n]
    assert len(steps) == 4 and all(p.requires_grad for p in steps)  # one learned step tensor per layer
    model.train()
    model(x[:16]).sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in steps)
    ste_model = make_cnn()
    compress(ste_model, QAT(w_bits=4, a_bits=8, step="ste", fold_bn=False), [x[:16]], finalize=False)
    assert not [n for n, _ in ste_model.named_parameters() if "weight_q" in n]  # min-max steps, not learned
