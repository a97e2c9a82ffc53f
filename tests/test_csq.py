"""CSQ: relaxed bits anneal to an exact quantized weight; the budget term's sign follows the budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitsmith import compress, load, save
from bitsmith.methods.qat.csq import CSQ, selected_fraction
from bitsmith.quant.csq import CSQQuantizer
from conftest import make_cnn


def test_hardened_weight_is_exact_sign_magnitude_on_the_selected_bits() -> None:
    q = CSQQuantizer(6).calibrate_(torch.randn(8, 8))
    with torch.no_grad():
        q.mask.copy_(torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0, -1.0]))  # bits 1, 2 and 4 selected
    q.harden_()
    integers = q(torch.empty(0)).detach() / q.step.detach()
    assert torch.allclose(integers, integers.round(), atol=1e-4)
    assert (integers.round().abs().to(torch.int64) & 0b101001).eq(0).all()  # no unselected bit is set
    assert q.active_bits == 3 and q.bits == 4  # stored span: bits 1..4


def test_rising_temperature_makes_the_relaxation_exact() -> None:
    q = CSQQuantizer(4).calibrate_(torch.randn(16, 16))
    gaps = []
    for beta in (1.0, 20.0, 200.0):
        q.beta.fill_(beta)
        gaps.append(q.max_relaxation_gap())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3


@pytest.mark.parametrize("mask_init,sign", [(2.0, 1.0), (-2.0, -1.0)])
def test_budget_term_prunes_over_budget_and_grows_under_it(mask_init: float, sign: float, calib, images) -> None:
    model = make_cnn()
    method = CSQ(start_bits=6, target_bits=3, lam=1.0, mask_init=mask_init, where={"exclude": ["@first"]})
    compress(model, method, calib, finalize=False)
    quantizers = method._quantizers(model)
    assert selected_fraction(quantizers, "size") == pytest.approx(1.0 if mask_init > 0 else 1 / 6)  # >= 1 bit
    method.penalty(model, images).backward()
    for q in quantizers:  # SGD moves the selection logits against the gradient: down over budget, up under it
        assert (torch.sign(q.mask.grad) == sign).all()


def test_finalized_csq_model_round_trips_bit_exactly(calib, images, tmp_path: Path) -> None:
    model = make_cnn()
    method = CSQ(start_bits=5, target_bits=3, mask_init=1.0)
    compress(model, method, calib)  # finalize hardens every bit
    with torch.no_grad():
        expected = model.eval()(images)
    reloaded = load(save(model, tmp_path / "csq.safetensors"), make_cnn())
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(images), expected)
    assert method.average_bits(model) == pytest.approx(5.0)


def test_prepare_keeps_the_pretrained_weights_of_a_layer_without_a_norm_after_it() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    pretrained = {name: layer.weight.detach().clone() for name, layer in model.named_children() if name != "1"}
    compress(model, CSQ(start_bits=6, target_bits=3, a_bits=None), [torch.randn(8, 32)], finalize=False)
    for name, weight in pretrained.items():
        layer = model.get_submodule(name)
        soft = layer.weight_q(layer.weight).detach()
        assert float((soft - weight).norm() / weight.norm()) <= 0.03, name


def test_the_temperature_rises_to_t_final_at_the_ticket_and_the_selection_then_turns_hard(calib) -> None:
    model = make_cnn()
    method = CSQ(start_bits=4, target_bits=2, t_final=100.0, ticket_epoch=2)
    compress(model, method, calib, finalize=False)
    q = method._quantizers(model)[0]
    with torch.no_grad():
        q.mask.copy_(torch.tensor([-0.2, 0.1, 0.3, -0.05]))
    method.schedule(model, 1, 3)
    assert float(q.beta) == pytest.approx(10.0) and not bool(q.hard_mask)
    soft = q.selection().detach()
    assert ((soft > 0) & (soft < 1)).all()
    method.schedule(model, 2, 3)  # the ticket: beta = t_final, the selection a step function
    assert float(q.beta) == pytest.approx(100.0) and bool(q.hard_mask)
    assert torch.equal(q.selection(), torch.tensor([0.0, 1.0, 1.0, 0.0]))


def test_the_budget_fraction_is_weighted_by_layer_size_or_averaged_over_layers() -> None:
    big, small = CSQQuantizer(4).calibrate_(torch.randn(30, 10)), CSQQuantizer(4).calibrate_(torch.randn(2, 5))
    with torch.no_grad():
        big.mask.fill_(1.0)  # 4 of 4 positions selected, 300 weights
        small.mask.copy_(torch.tensor([-1.0, -1.0, -1.0, 1.0]))  # 1 of 4, 10 weights
    assert selected_fraction([big, small], "size") == pytest.approx((300 * 1.0 + 10 * 0.25) / 310)
    assert selected_fraction([big, small], "layers") == pytest.approx((1.0 + 0.25) / 2)
