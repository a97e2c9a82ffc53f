"""Bit-slice sparsity: exact slice decomposition, straight-through gradients, sparser slices after training."""

from __future__ import annotations

import copy

import torch

from bitsmith import compress
from bitsmith.methods.bitslice import BitSlice, bit_slices, power_of_two_step
from bitsmith.train import TrainConfig, accuracy, fit
from conftest import make_cnn
from test_qat import toy_data


def test_slices_reconstruct_the_fixed_point_code_and_pass_gradients() -> None:
    torch.manual_seed(0)
    w = torch.randn(200, requires_grad=True)
    step = power_of_two_step(w)
    assert 64 <= float(w.abs().max()) / step <= 128  # the power-of-two step just covers the range
    slices = bit_slices(w, step, slice_bits=2)
    assert len(slices) == 4 and all(((s >= 0) & (s <= 3)).all() for s in slices)
    assert float(slices[0].max()) <= 1  # 7 magnitude bits: the top slice has one bit
    code = torch.round(w.detach().abs() / step).clamp(0, 127)
    assert torch.equal(sum(s.detach() * 4 ** (3 - k) for k, s in enumerate(slices)), code)
    sum(s.sum() for s in slices).backward()
    assert (w.grad.abs() > 0).all()


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
