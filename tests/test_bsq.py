"""BSQ: the group Lasso removes bit planes, layers end at their own exact precision, training resumes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bitsmith import compress, load, model_cost, save
from bitsmith.methods.qat.bsq import BSQ, adjust_precision, fix_scheme
from bitsmith.methods.qat.msq import MSQ
from bitsmith.quant.bitplane import BitPlaneQuantizer
from bitsmith.quant.roundclamp import RoundClampQuantizer
from bitsmith.train import TrainConfig, TrainState, accuracy, fit
from conftest import make_cnn
from test_qat import toy_data


def test_precision_adjustment_is_exact_and_drops_empty_planes() -> None:
    q = BitPlaneQuantizer(8)
    q.calibrate_(torch.randn(16, 16))
    with torch.no_grad():  # make the weight use only bits 2..5 of 8
        q._set((q._integers() / 8).round().clamp(-15, 15) * 4, q.step.detach(), 8)
    before = q(torch.empty(0)).detach()
    adjust_precision(q, max_bits=8)
    assert q.bits == 4 and torch.equal(q(torch.empty(0)).detach(), before)
    with torch.no_grad():  # planes drifted above 1: the MSB grows back, values kept
        q.pos.mul_(1.9)
    grown = torch.round(q.integer_value().detach())
    adjust_precision(q, max_bits=8)
    assert q.bits == 5 and torch.equal(torch.round(q.integer_value().detach()), grown.clamp(-31, 31))


def test_bsq_lowers_average_bits_with_exact_planes_and_round_trips(tmp_path: Path) -> None:
    model = make_cnn()
    x, y = toy_data(512)
    fit(model, x, y, TrainConfig(epochs=4, batch_size=32, optimizer="adamw", lr=1e-2, weight_decay=0))
    method = BSQ(alpha=1.4, start_bits=8, a_bits=8, finetune_epochs=1, finetune="planes")
    compress(model, method, [x[:64]])
    assert model_cost(model).totals["avg_weight_bits"] == 8.0
    fit(model, x, y, TrainConfig(epochs=4, batch_size=32, optimizer="sgd", lr=0.05, weight_decay=0), [method])
    method.finalize(model)  # exact {0, 1} planes
    bits = method.precision(model)
    assert model_cost(model).totals["avg_weight_bits"] < 4 and len(set(bits.values())) > 1, bits
    assert bits["fc1"] < bits["stem"]  # the largest layer ends lowest, the 72-weight stem highest
    assert accuracy(model, x, y) > 0.9
    for name in bits:
        q = model.get_submodule(name).weight_q
        assert set(q.pos.unique().tolist()) <= {0.0, 1.0} and set(q.neg.unique().tolist()) <= {0.0, 1.0}
    reloaded = load(save(model, tmp_path / "bsq.safetensors"), make_cnn())
    assert torch.equal(reloaded(x[:8]), model.eval()(x[:8]))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("make_method", [lambda: BSQ(alpha=2.0, finetune_epochs=1),
                                         lambda: MSQ(alpha=0.005, finetune_epochs=1, adjust_steps=4)])  # fmt: skip
def test_bit_level_training_resumes_across_precision_changes_and_into_the_finetune(
    tmp_path: Path, make_method: Callable[[], BSQ]
) -> None:
    x, y = toy_data(256)
    cfg = TrainConfig(epochs=3, batch_size=32, optimizer="sgd", lr=0.05, weight_decay=0)

    def prepared() -> tuple[torch.nn.Module, BSQ]:
        model, method = make_cnn(), make_method()
        compress(model, method, [x[:64]])
        return model, method

    reference, method = prepared()
    fit(reference, x, y, cfg, [method])

    def kill_in_the_finetune(model: torch.nn.Module, state: TrainState) -> None:
        if state.epoch == 3:  # before its checkpoint: the run resumes after epoch 2, into the finetune
            raise Interrupt

    model, method = prepared()
    with pytest.raises(Interrupt):
        fit(model, x, y, cfg, [method], checkpoint=tmp_path / "s.pt", callbacks=[kill_in_the_finetune])
    resumed, method = prepared()
    fit(resumed, x, y, cfg, [method], checkpoint=tmp_path / "s.pt")
    assert method.precision(resumed) == method.precision(reference)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_fixed_scheme_finetune_starts_from_the_exact_bsq_model(tmp_path: Path) -> None:
    x, y = toy_data(256)
    model, method = make_cnn(), BSQ(alpha=2.0, finetune_epochs=1)
    compress(model, method, [x[:64]])
    fit(model, x, y, TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.05, weight_decay=0), [method])
    method.finalize(model)
    bits, before = method.precision(model), model.eval()(x[:16]).detach()
    fix_scheme(model, method.precision(model))
    assert torch.equal(model(x[:16]), before) and method.precision(model) == bits
    assert all(isinstance(model.get_submodule(n).weight_q, RoundClampQuantizer) for n in bits)
    assert all(model.get_submodule(n).weight.requires_grad for n in bits)
    reloaded = load(save(model, tmp_path / "fixed.safetensors"), make_cnn())
    assert torch.equal(reloaded(x[:16]), before)


def test_the_fixed_scheme_passes_the_gradient_straight_through_zero_codes_and_the_clip() -> None:
    weight = torch.tensor([0.0, 0.01, 0.3, -0.7, 5.0], requires_grad=True)  # a zero code and a clipped value
    q = RoundClampQuantizer(2, gradient="identity").calibrate_(torch.tensor([0.9]))
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    (q(weight) * upstream).sum().backward()
    assert torch.equal(weight.grad, upstream)  # the official fine-tune's STE: identity everywhere
    assert torch.equal(q(weight.detach()), q.integers(weight.detach()) * q.step)  # the value is the code


def test_bsq_planes_are_clamped_after_every_optimizer_step() -> None:
    x, y = toy_data(64)
    model, method = make_cnn(), BSQ(alpha=0.0, start_bits=4)
    compress(model, method, [x[:16]])
    with torch.no_grad():  # planes outside [0, 2], as an optimizer step can leave them
        model.fc1.weight_q.pos.add_(2.5)
        model.fc1.weight_q.neg.sub_(0.5)
    seen = []

    def record_planes(module: torch.nn.Module, args: tuple) -> None:
        q = model.fc1.weight_q
        seen.append((float(torch.minimum(q.pos.min(), q.neg.min())), float(torch.maximum(q.pos.max(), q.neg.max()))))

    model.fc1.register_forward_pre_hook(record_planes)
    fit(model, x, y, TrainConfig(epochs=1, batch_size=8, optimizer="sgd", lr=0.0, weight_decay=0), [method])
    assert seen[0] == (-0.5, 3.5)  # the first forward reads what it was given
    assert len(seen) == 8 and all(low >= 0.0 and high <= 2.0 for low, high in seen[1:]), seen


def test_the_finetune_epochs_train_the_fixed_scheme_without_the_regulariser(calib: list) -> None:
    model, method = make_cnn(), BSQ(alpha=1.0, finetune_epochs=1)
    compress(model, method, calib, finalize=False)
    assert float(method.penalty(model, calib[0])) > 0
    method.schedule(model, 1, 3)  # a regularised epoch: planes still train
    assert float(method.penalty(model, calib[0])) > 0 and isinstance(model.fc1.weight_q, BitPlaneQuantizer)
    method.schedule(model, 2, 3)  # the fine-tune starts: float weights behind the identity-gradient STE
    assert float(method.penalty(model, calib[0])) == 0
    q = model.fc1.weight_q
    assert isinstance(q, RoundClampQuantizer) and q.gradient == "identity"
    model.train()
    model(calib[0][0]).sum().backward()
    zero_codes = q.integers(model.fc1.weight.detach()) == 0
    assert bool(zero_codes.any()) and bool((model.fc1.weight.grad[zero_codes] != 0).any())  # zero codes still learn
