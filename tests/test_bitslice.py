"""Bit-slice sparsity: exact slice decomposition, straight-through gradients, sparser slices after training."""

from __future__ import annotations

import copy

import pytest
import torch

from bitsmith import compress
from bitsmith.methods.qat.bitslice import BitSlice, bit_slices, power_of_two_step
from bitsmith.train import TrainConfig, accuracy, fit
from conftest import make_cnn
from test_qat import toy_data


def test_slices_reconstruct_the_fixed_point_code_and_pass_gradients() -> None:
    torch.manual_seed(0)
    w = torch.randn(200, requires_grad=True)
    step = power_of_two_step(w)
    assert 128 <= float(w.abs().max()) / step <= 256  # the step 2^(s-8) just covers the range
    slices = bit_slices(w, step, slice_bits=2)
    assert len(slices) == 4 and all(((s >= 0) & (s <= 3)).all() for s in slices)
    assert float(slices[0].max()) == 3  # an 8-bit magnitude: four full 2-bit slices
    code = torch.round(w.detach().abs() / step).clamp(0, 255)
    assert torch.equal(sum(s.detach() * 4 ** (3 - k) for k, s in enumerate(slices)), code)
    sum(s.sum() for s in slices).backward()
    assert (w.grad.abs() > 0).all()


def test_the_penalty_is_one_mean_over_all_slices_of_all_weights(calib) -> None:
    model = make_cnn()
    method = BitSlice(alpha=0.5, prune_threshold=0.0, where={"include": ["conv", "fc1"]})
    compress(model, method, calib, finalize=False)
    slices = [bit_slices(model.get_submodule(n).weight, method._step(model.get_submodule(n))) for n in ("conv", "fc1")]
    numel = model.conv.weight.numel() + model.fc1.weight.numel()
    expected = 0.5 * sum(float(s.abs().sum()) for layer in slices for s in layer) / (4 * numel)
    assert float(method.penalty(model, None)) == pytest.approx(expected, rel=1e-6)
    l1 = BitSlice(regularizer="l1", alpha=0.5, prune_threshold=0.0, where={"include": ["conv", "fc1"]})
    expected_l1 = 0.5 * sum(float(model.get_submodule(n).weight.abs().sum()) / method._step(model.get_submodule(n))
                            for n in ("conv", "fc1")) / numel  # fmt: skip
    l1._layers = method._layers
    assert float(l1.penalty(model, None)) == pytest.approx(expected_l1, rel=1e-6)


def test_weights_sit_on_the_slice_grid(calib) -> None:
    model = make_cnn()
    method = BitSlice(prune_threshold=0.0, where={"include": ["fc1"]})
    compress(model, method, calib, finalize=False)
    step = method._step(model.fc1)
    codes = model.fc1.effective_weight().detach() / step
    assert torch.equal(codes, codes.round()) and float(codes.abs().max()) > 127  # the 8th magnitude bit is used


def test_bitslice_training_zeroes_more_slices_than_it_started_with() -> None:
    x, y = toy_data(512)
    base = make_cnn()
    fit(base, x, y, TrainConfig(epochs=3, batch_size=32, optimizer="adamw", lr=1e-2, weight_decay=0))
    model = copy.deepcopy(base)
    method = BitSlice(alpha=0.5, prune_threshold=0.01)
    compress(model, method, [x[:64]], finalize=False)
    before = method.slice_sparsity(model)
    fit(model, x, y, TrainConfig(epochs=4, batch_size=32, optimizer="sgd", lr=0.01, weight_decay=0), [method])
    after = method.slice_sparsity(model)
    assert sum(after) > sum(before), (before, after)
    assert accuracy(model, x, y) > 0.9


def test_prepare_prunes_below_the_threshold_and_keeps_the_masks(calib) -> None:
    model = make_cnn()
    weight = model.fc1.weight.detach().clone()
    method = BitSlice(prune_threshold=0.05, where={"include": ["fc1"]})
    compress(model, method, calib, finalize=False)
    assert torch.equal(model.fc1.mask, weight.abs() >= 0.05) and not bool(model.fc1.mask.all())
    assert torch.equal(
        model.fc1.effective_weight().detach()[~model.fc1.mask], torch.zeros(int((~model.fc1.mask).sum()))
    )
