"""BRECQ / AdaRound: the soft weight starts at the float weight, the hard rounding lies on the quantizer's grid,
reconstruction units follow the named blocks, and learning the rounding against the float model beats nearest
rounding on a tiny CNN at W2A4."""

from __future__ import annotations

import copy

import pytest
import torch

from bitsmith import build_method, compress
from bitsmith.data import batches
from bitsmith.quant.adaround import AdaRound, rounding_regularizer
from bitsmith.quant.uniform import UniformQuantizer
from bitsmith.reconstruct import units
from conftest import make_cnn


def weight_quantizer(weight: torch.Tensor, bits: int = 3) -> UniformQuantizer:
    return UniformQuantizer(bits, symmetric=False, granularity="channel").calibrate_(weight)  # type: ignore[return-value]


def test_the_soft_weight_starts_at_the_float_weight_and_the_hard_one_is_on_the_grid() -> None:
    weight = torch.randn(6, 5)
    base = weight_quantizer(weight)
    rounder = AdaRound(base, weight)
    scale, zero = base.scale[:, None], base.zero_point[:, None]
    on_range = weight.clamp((base.qmin - zero) * scale, (base.qmax - zero) * scale)  # the grid's range clips
    assert torch.allclose(rounder(weight), on_range, atol=1e-3 * float(base.scale.max()))
    hard = rounder.rounded_weight(weight)
    assert torch.allclose(base(hard), hard, atol=1e-6)
    assert torch.allclose(hard, base(weight), atol=1e-6)  # before learning: nearest rounding


def test_the_regulariser_is_zero_only_when_every_weight_has_decided() -> None:
    assert float(rounding_regularizer(torch.tensor([8.0, -8.0]), beta=2.0)) == pytest.approx(0, abs=1e-6)
    assert float(rounding_regularizer(torch.tensor([0.0]), beta=2.0)) > 0.9


def test_units_are_the_named_blocks_then_single_layers_in_model_order() -> None:
    lin = torch.nn.Linear
    model = torch.nn.Sequential(lin(2, 2), torch.nn.Sequential(lin(2, 2), torch.nn.ReLU(), lin(2, 2)), lin(2, 2))
    layers = ["0", "1.0", "1.2", "2"]
    assert units(model, layers, []) == [(n, [n]) for n in layers]
    assert units(model, layers, ["1"]) == [("0", ["0"]), ("1", ["1.0", "1.2"]), ("2", ["2"])]
    assert units(model, layers, ["1", "1.*", "2"]) == [("0", ["0"]), ("1", ["1.0", "1.2"]), ("2", ["2"])]


def output_error(model: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - reference(x)).pow(2).mean())


def test_learned_rounding_beats_nearest_rounding_at_w2a4() -> None:
    torch.manual_seed(0)
    x, y = torch.rand(128, 1, 12, 12), torch.randint(0, 10, (128,))
    calibration = list(batches(x, y, 32))
    fp = make_cnn()
    nearest, learned = copy.deepcopy(fp), copy.deepcopy(fp)
    compress(nearest, build_method({"name": "ptq", "w_bits": 2, "a_bits": 4, "w_symmetric": False}), calibration)
    method = build_method({"name": "brecq", "w_bits": 2, "a_bits": 4, "iters": 1000})
    compress(learned, method, calibration)
    assert sum(s["after"] for s in method._stats.values()) < 0.8 * sum(s["before"] for s in method._stats.values())
    assert output_error(learned, fp, x) < 0.7 * output_error(nearest, fp, x)


def test_a_grouped_weight_grid_is_refused() -> None:
    with pytest.raises(ValueError, match="w_granularity 'group'"):
        build_method({"name": "brecq", "w_granularity": "group"})


def test_the_two_pass_mode_rounds_with_float_activations_then_learns_only_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import bitsmith.reconstruct as reconstruct
    from bitsmith.nn import QuantizedMixin

    torch.manual_seed(0)
    x, y = torch.rand(128, 1, 12, 12), torch.randint(0, 10, (128,))
    calibration = list(batches(x, y, 32))
    fp = make_cnn()
    model = copy.deepcopy(fp)
    seen: list[tuple[bool, bool, bool]] = []  # (rounding, steps, any activation quantized) per unit
    original = reconstruct.reconstruct_unit

    def spy(model_: torch.nn.Module, *args: object, rounding: bool = True, steps: bool = True, **kw: object) -> dict:
        quantized = any(m.input_q is not None for m in model_.modules() if isinstance(m, QuantizedMixin))
        seen.append((rounding, steps, quantized))
        return original(model_, *args, rounding=rounding, steps=steps, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(reconstruct, "reconstruct_unit", spy)
    method = build_method({"name": "brecq", "w_bits": 2, "a_bits": 4, "iters": 300, "a_iters": 100})
    compress(model, method, calibration)
    units = len(seen) // 2
    assert seen == [(True, False, False)] * units + [(False, True, True)] * units
    assert sum(name.endswith("(steps)") for name in method._stats) == units
    nearest = copy.deepcopy(fp)
    compress(nearest, build_method({"name": "ptq", "w_bits": 2, "a_bits": 4, "w_symmetric": False}), calibration)
    assert output_error(model, fp, x) < 0.7 * output_error(nearest, fp, x)


def test_every_unit_is_matched_to_the_float_model_not_to_the_rounded_earlier_units(monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import bitsmith.reconstruct as reconstruct

    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 12, 12), torch.randint(0, 10, (64,))
    fp = make_cnn()
    model = copy.deepcopy(fp)
    floats = {n: m.weight.detach().clone() for n, m in fp.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}  # fmt: skip
    intact: list[bool] = []
    original = reconstruct.reconstruct_unit

    def spy(model_: torch.nn.Module, reference: torch.nn.Module, *args: object, **kw: object) -> dict:
        intact.append(all(torch.equal(reference.get_submodule(n).weight, w) for n, w in floats.items()))
        return original(model_, reference, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(reconstruct, "reconstruct_unit", spy)
    compress(model, build_method({"name": "brecq", "w_bits": 2, "a_bits": 4, "iters": 5}), list(batches(x, y, 32)))
    assert len(intact) > 2 and all(intact)
    assert not all(torch.equal(model.get_submodule(n).weight, w) for n, w in floats.items())  # the model is rounded


def test_the_reconstruction_loss_sums_channels_and_averages_positions() -> None:
    """The official lp_loss: summed over dim 1 (channels), averaged over examples and pixels, so the rounding
    regulariser keeps its intended weight whatever the feature map's size."""
    from bitsmith.reconstruct import lp_loss

    a, b = torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5)
    b[0, :, 1, 2] = 1.0  # three channels differ by 1 at one of the 2 x 20 (example, pixel) positions
    assert float(lp_loss([a], [b], 2.0)) == pytest.approx(3 / 40)


def test_each_unit_reports_how_many_roundings_were_still_undecided() -> None:
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 12, 12), torch.randint(0, 10, (64,))
    shares = {}
    for iters, lam in ((1, 0.0), (400, 1.0)):
        method = build_method({"name": "brecq", "w_bits": 2, "a_bits": 8, "iters": iters, "lam": lam, "warmup": 0.0})
        compress(make_cnn(), method, list(batches(x, y, 32)))
        shares[iters] = [s["undecided"] for s in method._stats.values()]
    assert all(s > 0.9 for s in shares[1])  # the soft rounding starts at the float weight: nothing decided yet
    assert max(shares[400]) < min(shares[1])
