"""Codebook and bit-plane quantizers: nearest level, k-means, exact planes, adding/removing bits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.quant import BitPlaneQuantizer, CodebookQuantizer, build_quantizer, kmeans_1d
from bitsmith.quant.bitplane import to_planes
from bitsmith.quant.functional import fake_quant


def test_codebook_nearest_level_and_exact_round_trip() -> None:
    q = CodebookQuantizer(levels=[-1.0, -0.25, 0.0, 0.5, 2.0])
    x = torch.tensor([-3.0, -0.7, -0.2, 0.2, 0.3, 1.3, 9.0])
    assert q(x).tolist() == [-1.0, -1.0, -0.25, 0.0, 0.5, 2.0, 2.0]
    assert q.bits == 3
    enc = q.encode(x)
    assert torch.equal(q.decode(enc), q(x))
    assert torch.equal(q(q(x)), q(x))


def test_codebook_straight_through_and_learnable_levels() -> None:
    q = CodebookQuantizer(levels=[-1.0, 1.0], learn_levels=True)
    x = torch.tensor([-0.3, 0.2, 0.9], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]
    assert q.levels.grad.tolist() == [1.0, 2.0]


def test_kmeans_finds_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    data = torch.cat([torch.randn(500, generator=gen) * 0.01 + c for c in (-2.0, 0.0, 3.0)])
    centres = kmeans_1d(data, 3)
    assert torch.allclose(centres, torch.tensor([-2.0, 0.0, 3.0]), atol=0.01)


def test_codebook_calibration_beats_uniform_on_gaussian() -> None:
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    q = CodebookQuantizer(num_levels=4).calibrate_(x)
    uniform = fake_quant(x, x.abs().max() / 1.5, torch.tensor(1.5), 0, 3)  # 4 uniform levels over the range
    assert (q(x) - x).pow(2).mean() < (uniform - x).pow(2).mean()
    # Lloyd-Max optimum for 4 levels on N(0,1) has MSE 0.1175
    assert abs(float((q(x) - x).pow(2).mean()) - 0.1175) < 0.01


def test_codebook_config_round_trip() -> None:
    q = CodebookQuantizer(num_levels=8).calibrate_(torch.randn(1000))
    twin = build_quantizer(q.config())
    twin.load_state_dict(q.state_dict())
    x = torch.randn(50)
    assert torch.equal(twin(x), q(x))


def test_codebook_rejects_bad_levels() -> None:
    with pytest.raises(ValueError, match="increasing"):
        CodebookQuantizer(levels=[1.0, 0.0])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(0, 10_000))
def test_bitplane_equals_round_to_nearest(bits: int, seed: int) -> None:
    w = torch.randn(5, 6, generator=torch.Generator().manual_seed(seed))
    q = BitPlaneQuantizer(bits).calibrate_(w)
    levels = 2**bits - 1
    step = w.abs().max() / levels
    expected = torch.round(w / step).clamp(-levels, levels) * step
    assert torch.allclose(q(w), expected, atol=1e-6)
    assert set(q.pos.unique().tolist()) <= {0.0, 1.0}
    enc = q.encode(w)
    assert torch.equal(q.decode(enc), q(w))
    assert enc.code_bits == bits + 1


def test_bitplane_drop_and_add_bits_are_exact() -> None:
    w = torch.tensor([[4.0, -8.0, 12.0, 0.0]])  # multiples of 4 on a 4-bit grid with step 1 -> two zero LSBs
    q = BitPlaneQuantizer(4)
    q._set(w, torch.tensor(1.0), 4)
    before = q(w)
    q.drop_lsb_()
    q.drop_lsb_()
    assert q.bits == 2 and torch.equal(q(w), before) and q.step.item() == 4.0
    q.add_msb_()
    assert q.bits == 3 and torch.equal(q(w), before)
    q.drop_msb_()
    assert q.bits == 2 and torch.equal(q(w), before)


def test_bitplane_requantize_hardens_relaxed_planes() -> None:
    q = BitPlaneQuantizer(3).calibrate_(torch.randn(4, 4))
    with torch.no_grad():
        q.pos.add_(0.3 * torch.rand_like(q.pos))
        q.clamp_planes_()
    soft = q(torch.zeros(4, 4))
    q.requantize_()
    assert set(q.pos.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(q(torch.zeros(4, 4)), soft)


def test_bitplane_gradients() -> None:
    q = BitPlaneQuantizer(3).calibrate_(torch.randn(2, 2))
    q(torch.zeros(2, 2)).sum().backward()
    step = q.step.item()
    for b in range(3):  # dW/dP_b = step * 2^b, dW/dN_b = -(same)
        assert torch.allclose(q.pos.grad[b], torch.full((2, 2), step * 2**b))
        assert torch.allclose(q.neg.grad[b], torch.full((2, 2), -step * 2**b))


def test_to_planes() -> None:
    planes = to_planes(torch.tensor([0, 1, 5, 7]), 3)
    assert planes.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]]
