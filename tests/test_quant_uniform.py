"""Properties of the uniform quantizer (hypothesis): grid, idempotence, error bound, codes, exactness."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.quant import UniformQuantizer, build_quantizer
from bitsmith.quant.functional import fake_quant

CONFIGS = st.fixed_dictionaries(
    {
        "bits": st.integers(1, 16),
        "symmetric": st.booleans(),
        "granularity": st.sampled_from(["tensor", "channel", "group"]),
        "observer": st.sampled_from(["minmax", "percentile", "mse", "kl", "ema"]),
    }
)


def _tensor(seed: int, scale: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 8, generator=gen) * scale + torch.randn(1, generator=gen) * scale * 0.3


def _calibrated(config: dict, x: torch.Tensor) -> UniformQuantizer:
    group = {"group_size": 4} if config["granularity"] == "group" else {}
    return UniformQuantizer(**config, **group).calibrate_(x)


@settings(max_examples=60, deadline=None)
@given(CONFIGS, st.integers(0, 10_000), st.floats(1e-3, 1e3))
def test_encode_decode_exact_and_codes_in_range(config: dict, seed: int, scale: float) -> None:
    x = _tensor(seed, scale)
    q = _calibrated(config, x)
    enc = q.encode(x)
    assert enc.codes.dtype == torch.int32
    assert int(enc.codes.min()) >= enc.code_min
    assert int(enc.codes.max()) <= enc.code_min + 2**enc.code_bits - 1
    assert torch.equal(q.decode(enc), q(x))


@settings(max_examples=60, deadline=None)
@given(CONFIGS, st.integers(0, 10_000), st.floats(1e-3, 1e3))
def test_grid_values_unchanged_and_idempotent(config: dict, seed: int, scale: float) -> None:
    x = _tensor(seed, scale)
    q = _calibrated(config, x)
    y = q(x)
    assert torch.equal(q(y), y)
    grid = q.decode(q.encode(torch.randn_like(x) * scale * 3))
    assert torch.equal(q(grid), grid)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 16), st.booleans(), st.integers(0, 10_000))
def test_error_at_most_half_step_inside_range(bits: int, symmetric: bool, seed: int) -> None:
    x = _tensor(seed, 1.0)
    q = UniformQuantizer(bits, symmetric, "channel").calibrate_(x)
    s, z = q.scale[:, None], q.zero_point[:, None]
    lo, hi = s * (q.qmin - z), s * (q.qmax - z)
    inside = (x >= lo) & (x <= hi)
    err = (q(x) - x).abs()
    bound = s / 2 * (1 + 1e-5) + 1e-7
    assert bool((err <= bound)[inside].all())


def test_min_max_range_is_covered_exactly() -> None:
    x = torch.tensor([[-1.0, 0.5, 2.0]])
    q = UniformQuantizer(8, symmetric=False).calibrate_(x)
    assert q.qmin == 0 and q.qmax == 255
    assert torch.allclose(q.scale, torch.tensor([3.0 / 255]))
    assert torch.equal(q(torch.zeros(1)), torch.zeros(1))  # zero is exactly representable


def test_binary_quantizer_values() -> None:
    x = torch.tensor([-3.0, -0.1, 0.0, 0.2, 4.0])
    q = UniformQuantizer(1, symmetric=True).calibrate_(x)
    y = q(x)
    assert set(y.tolist()) == {-4.0, 4.0}
    assert torch.equal(torch.sign(y), torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))


def test_ste_gradient_is_one_inside_zero_outside() -> None:
    q = UniformQuantizer(4, symmetric=True, step="fixed", scale=0.1)  # range [-0.8, 0.7]
    x = torch.tensor([-2.0, -0.5, 0.0, 0.33, 0.7, 5.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_step_gradient_matches_formula() -> None:
    q = UniformQuantizer(4, symmetric=True, step="learned")
    x = torch.tensor([-2.0, -0.26, 0.04, 0.31, 5.0])
    q(x)  # LSQ initialisation from the first batch
    with torch.no_grad():
        q.scale.fill_(0.1)
    q.scale.grad = None
    q(x).sum().backward()
    v = x / 0.1
    qn, qp = 8, 7
    inside = torch.where(v <= -qn, -qn, torch.where(v >= qp, qp, torch.round(v) - v))
    g = 1.0 / math.sqrt(x.numel() * qp)
    assert torch.allclose(q.scale.grad, (inside.sum() * g).reshape(1), atol=1e-6)


def test_lsq_init_is_two_mean_abs_over_sqrt_qp() -> None:
    x = torch.randn(100)
    q = UniformQuantizer(4, symmetric=True, step="learned")
    q(x)
    assert torch.allclose(q.scale, 2 * x.abs().mean() / math.sqrt(7))


def test_group_and_channel_shapes() -> None:
    w = torch.randn(4, 2, 3, 3)  # conv weight: 18 inputs per output channel
    q = UniformQuantizer(4, granularity="group", group_size=6).calibrate_(w)
    assert q.scale.shape == (12,)
    assert q(w).shape == w.shape
    with pytest.raises(ValueError, match="does not divide"):
        UniformQuantizer(4, granularity="group", group_size=5).calibrate_(w)
    act = torch.randn(2, 5, 7)
    qa = UniformQuantizer(8, symmetric=False, granularity="channel", ch_axis=-1).calibrate_(act)
    assert qa.scale.shape == (7,)
    assert qa(torch.randn(3, 9, 7)).shape == (3, 9, 7)


def test_dynamic_per_token() -> None:
    q = UniformQuantizer(8, symmetric=False, granularity="token", dynamic=True)
    x = torch.randn(2, 3, 16) * torch.tensor([1.0, 100.0, 0.01]).view(1, 3, 1)
    err = (q(x) - x).abs().amax(-1) / x.abs().amax(-1)
    assert float(err.max()) < 0.01  # each token has its own scale
    enc = q.encode(x)
    assert torch.equal(q.decode(enc), q(x))


def test_config_round_trip_and_state_resize() -> None:
    q = UniformQuantizer(3, symmetric=False, granularity="channel", observer="mse").calibrate_(torch.randn(5, 7))
    twin = build_quantizer(q.config())
    twin.load_state_dict(q.state_dict())
    x = torch.randn(5, 7)
    assert torch.equal(twin(x), q(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 0}, "between 1 and 16"),
        ({"bits": 17}, "between 1 and 16"),
        ({"granularity": "row"}, "granularity"),
        ({"granularity": "group"}, "group_size"),
        ({"step": "fixed"}, "scale"),
        ({"observer": "nope"}, "observer"),
        ({"granularity": "token"}, "dynamic"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UniformQuantizer(**kwargs)


def test_uncalibrated_quantizer_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match="calibrat"):
        UniformQuantizer(8)(torch.randn(3))


def test_fake_quant_formula() -> None:
    x = torch.tensor([0.26, -0.74, 3.0])
    y = fake_quant(x, torch.tensor(0.5), torch.tensor(2.0), 0, 7)
    # codes: round(0.52)+2=3, round(-1.48)+2=1, round(6)+2=8->7
    assert y.tolist() == [0.5, -0.5, 2.5]


def test_quantized_model_moves_with_to() -> None:
    """``model.to(...)`` walks every submodule's ``_apply``: a quantizer must not shadow it (ART calls ``to``)."""
    from bitsmith.quant.uniform import UniformQuantizer

    q = UniformQuantizer(bits=4)
    assert q.to(torch.float64) is q and q.to("cpu") is q
