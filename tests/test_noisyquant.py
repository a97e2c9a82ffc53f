"""NoisyQuant and SmoothQuant: exact folds, searches that never make things worse, the dither theory."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bitsmith import compress, load, save, strip
from bitsmith.methods.ptq.noisyquant import NoisyQuant, grid_search
from bitsmith.methods.ptq.ptq import PTQ
from bitsmith.methods.ptq.smoothquant import SmoothQuant
from bitsmith.nn import QLinear
from bitsmith.quant.noisy import NoisyBias
from bitsmith.quant.uniform import UniformQuantizer


class Block(nn.Module):
    """A transformer-style MLP block, pre-LN (``y = x + fc2(gelu(fc1(ln(x))))``) or post-LN
    (``y = ln(x + fc2(gelu(fc1(x))))``, whose LN output also feeds the next block's residual)."""

    def __init__(self, dim: int = 16, pre_norm: bool = True) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.ln = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln(x))))
        return self.ln(x + self.fc2(nn.functional.gelu(self.fc1(x))))


def make_model(pre_norm: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), Block(pre_norm=pre_norm), Block(pre_norm=pre_norm), nn.Linear(16, 4))
    with torch.no_grad():  # activation outliers in two channels, as in real transformers
        model[0].weight[:, :] *= 0.5
        model[0].weight[3] *= 20
        model[0].weight[11] *= 12
    return model.eval()


def tokens(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 6, 8, generator=torch.Generator().manual_seed(seed))


def test_noisy_bias_fold_is_exact_and_survives_checkpoint_and_strip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layer = QLinear.from_float(nn.Linear(32, 8))
    inner = UniformQuantizer(6, symmetric=True).calibrate_(torch.randn(256, 32))
    noisy = NoisyBias(inner, 32)
    noisy.noise = 0.05 * torch.randn(32)
    layer.input_q = noisy
    x = torch.randn(10, 32)
    simulated = layer(x)  # W (Q(x + N) - N) + b
    assert torch.allclose(
        simulated, nn.functional.linear(inner(x + noisy.noise) - noisy.noise, layer.weight, layer.bias)
    )
    float_before = strip(nn.Sequential(layer))(x)
    assert noisy.fold_into(layer) and not noisy.fold_into(layer)  # idempotent
    assert torch.allclose(layer(x), simulated, atol=1e-5)  # W Q(x + N) + (b - W N)
    assert torch.allclose(strip(nn.Sequential(layer))(x), float_before, atol=1e-5)  # strip unfolds the bias
    model = nn.Sequential(layer)
    reloaded = load(save(model, tmp_path / "noisy.safetensors"), nn.Sequential(nn.Linear(32, 8)))
    assert torch.equal(reloaded(x), model(x)) and reloaded[0].input_q.folded


def test_grid_search_keeps_the_incumbent_on_ties_and_finds_the_minimum() -> None:
    assert grid_search(lambda v: 1.0, 0.0, 1.0, 5, keep=0.0) == 0.0
    assert grid_search(lambda v: (v - 0.37) ** 2, 0.0, 1.0, 11) == pytest.approx(0.37, abs=0.01)


def test_each_noisyquant_stage_lowers_the_output_error_on_outlier_activations() -> None:
    """The clip search, the mean shift and the noise each remove a share of the output error (summed
    over the layers): a stage that is switched off or inverted leaves its share."""
    model = make_model(pre_norm=True)
    nq = NoisyQuant(grid=8, rows=256)
    compress(
        model, [SmoothQuant(), PTQ(w_bits=6, a_bits=4, a_symmetric=True), nq], [tokens(32, seed=s) for s in (2, 3)]
    )
    total = {key: sum(r[key] for r in nq.report.values()) for key in ("mse_ptq", "mse_clip", "mse_mean", "mse_noise")}
    assert total["mse_clip"] <= 0.8 * total["mse_ptq"], total
    assert total["mse_mean"] <= 0.97 * total["mse_clip"], total
    assert total["mse_noise"] <= 0.97 * total["mse_mean"], total
    assert any(r["k"] > 0 for r in nq.report.values()) and any(r["mu_steps"] != 0 for r in nq.report.values())


@pytest.mark.parametrize("pre_norm", [True, False])
def test_noisyquant_never_worse_than_ptq_on_calibration_and_composes_with_smoothquant(
    pre_norm: bool, tmp_path: Path
) -> None:
    model, x = make_model(pre_norm), tokens()
    reference = model(x)
    calib = [tokens(32, seed=s) for s in (2, 3)]
    nq = NoisyQuant(grid=8, rows=256)
    sq = SmoothQuant()
    compress(model, [sq, PTQ(w_bits=6, a_bits=4, a_symmetric=True), nq], calib)
    for name, record in nq.report.items():
        assert record["mse_clip"] <= record["mse_ptq"] + 1e-9, name
        assert record["mse_mean"] <= record["mse_clip"] + 1e-9, name
        assert record["mse_noise"] <= record["mse_mean"] + 1e-9, name
    # post-LN: block 1's norm also feeds block 2's residual (fold refused); block 2's feeds only the head
    expected = {"1.fc1": True, "2.fc1": True} if pre_norm else {"2.fc1": False, "3": True}
    assert {name: r["folded"] for name, r in sq.report.items()} == expected
    out = model(x)
    assert torch.isfinite(out).all() and nn.functional.cosine_similarity(out, reference, dim=-1).mean() > 0.5
    reloaded = load(save(model, tmp_path / "m.safetensors"), make_model(pre_norm))
    assert torch.equal(reloaded(x), out)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_smoothquant_preserves_the_float_function_and_flattens_outliers(pre_norm: bool) -> None:
    model, x = make_model(pre_norm), tokens()
    reference = model(x)
    inputs: dict[str, torch.Tensor] = {}
    hook = model[1].fc1.register_forward_pre_hook(lambda m, a: inputs.__setitem__("before", a[0]))
    model(x)
    hook.remove()
    sq = SmoothQuant(alpha=0.5)
    compress(model, sq, [x])
    # pre-LN: folded into the norm; post-LN (the norm also feeds a residual): the fold is refused
    assert sq.report["2.fc1"]["folded"] is pre_norm
    assert torch.allclose(model(x), reference, atol=1e-4)
    fc1 = model[2].fc1
    seen: dict[str, torch.Tensor] = {}  # what fc1's activation quantizer would see
    hook = fc1.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("x", a[0] if fc1.smooth is None else a[0] / fc1.smooth)
    )
    model(x)
    hook.remove()

    def peak_ratio(t: torch.Tensor) -> float:
        per_channel = t.detach().abs().reshape(-1, t.shape[-1]).amax(0)
        return float(per_channel.max() / per_channel.median())

    assert peak_ratio(seen["x"]) < peak_ratio(inputs["before"])
    assert torch.allclose(strip(model)(x), reference, atol=1e-4)


def test_smoothquant_after_ptq_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="list smoothquant before"):
        compress(make_model(), [PTQ(), SmoothQuant()], [tokens(8)])
    with pytest.raises(ValueError, match="no Linear layer with an activation quantizer"):
        compress(make_model(), [PTQ(a_bits=None), NoisyQuant()], [tokens(8)])


def dithered_mse(offset: float, width: float, samples: int = 20001) -> float:
    """E[(Q(d + u) - (d + u))^2], u ~ U(-width/2, width/2), unit step: subtractive dither's error."""
    t = offset + torch.linspace(-width / 2, width / 2, samples, dtype=torch.float64)
    return float((t - t.round()).pow(2).mean())


def test_dither_theory_full_width_noise_makes_the_error_step_squared_over_12() -> None:
    for offset in (0.0, 0.1, 0.3, 0.45):
        assert dithered_mse(offset, 1.0) == pytest.approx(1 / 12, rel=1e-3)
    # so full-width noise helps exactly the values whose plain rounding error exceeds step / sqrt(12)
    assert dithered_mse(0.45, 1.0) < 0.45**2 and dithered_mse(0.2, 1.0) > 0.2**2


@pytest.mark.parametrize("regime", ["near-boundaries", "near-levels"])
def test_noise_helps_exactly_where_the_condition_predicts(regime: str) -> None:
    """Heavy-tailed activations (outliers fix the step at 1) whose per-channel peaks sit near decision
    boundaries (|d| in [0.35, 0.5] > 1/sqrt(12): noise must help) or near levels (|d| < 0.15: it cannot)."""
    channels, n = 64, 4096
    gen = torch.Generator().manual_seed(0)
    lo, hi = (0.35, 0.5) if regime == "near-boundaries" else (0.0, 0.15)
    offsets = (lo + (hi - lo) * torch.rand(channels, generator=gen)) * torch.sign(torch.randn(channels, generator=gen))
    centres = torch.randint(-20, 20, (channels,), generator=gen).float() + offsets
    x = centres + 0.02 * torch.randn(n, channels, generator=gen)
    x[0, 0], x[1, 1] = 127.0, -127.0  # the heavy tail: symmetric 8-bit min-max step = 127 / 127 = 1
    layer = nn.Linear(channels, channels, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(channels))  # layer output error = activation error
    model = nn.Sequential(layer)
    nq = NoisyQuant(clip_search=False, mean_shift=False, grid=41, rows=n)
    compress(model, [PTQ(w_bits=None, a_bits=8, a_symmetric=True), nq], [x])
    record = nq.report["0"]
    assert record["step"] == pytest.approx(1.0, rel=1e-6)
    if regime == "near-boundaries":
        assert record["k"] > 0.5 and record["mse_noise"] < 0.6 * record["mse_mean"]
        assert isinstance(model[0].input_q, NoisyBias)
    else:
        assert record["k"] == 0.0 and record["mse_noise"] == record["mse_mean"]
        assert not isinstance(model[0].input_q, NoisyBias)
    assert math.isfinite(record["mse_noise"])
