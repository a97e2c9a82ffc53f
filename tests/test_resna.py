"""The ReRAM crossbar model (exact mapping, read noise of the stated spread, ADC rounding) and ReSNA's noise-aware
training (it must beat the same training without noise when both are evaluated on noisy crossbars)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bitsmith import build_method, compress
from bitsmith.crossbar import (
    Crossbar,
    accuracy_under_noise,
    bit_slices,
    crossbar_forward,
    on_crossbars,
    power_of_two_step,
)
from bitsmith.train import TrainConfig, fit


def test_the_crossbar_stores_the_bit_slice_code() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 40)
    step = power_of_two_step(w)
    code = torch.round(w.abs() / step).clamp(0, 255)
    assert torch.equal(Crossbar().mapped_weight(w), torch.sign(w) * step * code)
    slices = bit_slices(w, step, 2)  # the bit-slice method's slices are the crossbar's cells
    assert torch.equal(sum(p * s for p, s in zip(Crossbar().places, slices, strict=True)), code)


@pytest.mark.parametrize("layer", [nn.Linear(40, 6), nn.Conv2d(3, 5, 3, padding=1, stride=2)])
def test_a_noise_free_crossbar_computes_the_mapped_layer(layer: nn.Module) -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 40) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 9, 9)
    mapped = copy.deepcopy(layer)
    mapped.weight.data = Crossbar().mapped_weight(layer.weight.detach())
    torch.testing.assert_close(crossbar_forward(layer, x, Crossbar(rows=16)), mapped(x))
    wide_adc = Crossbar(rows=16, adc_bits=20)  # bit line by bit line through a fine ADC: the same sums
    torch.testing.assert_close(crossbar_forward(layer, x, wide_adc, input_max=float(x.abs().max())), mapped(x),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


@pytest.mark.parametrize(("adc_bits", "conv"), [(None, False), (20, False), (None, True), (20, True)])
def test_read_noise_has_the_stated_spread_per_input_norm(adc_bits: int | None, conv: bool) -> None:
    torch.manual_seed(2)
    layer = nn.Conv2d(4, 8, 4, bias=False) if conv else nn.Linear(64, 8, bias=False)  # a conv of one position
    crossbar = Crossbar(rows=32, noise=0.05, adc_bits=adc_bits)
    x = torch.rand(1, 4, 4, 4).repeat(4000, 1, 1, 1) if conv else torch.rand(1, 64).repeat(4000, 1)  # 4,000 reads
    clean = crossbar_forward(layer, x[:1], Crossbar(rows=32))
    generator = torch.Generator().manual_seed(0)
    noisy = crossbar_forward(layer, x, crossbar, input_max=1.0, generator=generator)
    spread = float((noisy - clean).detach().std()) / float(x[0].norm())  # ||x|| over the conv's patch
    assert spread == pytest.approx(crossbar.noise_per_input_norm(layer.weight), rel=0.05)


def test_a_coarse_adc_rounds_every_bit_line() -> None:
    torch.manual_seed(3)
    layer = nn.Linear(64, 8)
    x = torch.rand(16, 64)
    ideal = crossbar_forward(layer, x, Crossbar(rows=32))
    errors = [float((crossbar_forward(layer, x, Crossbar(rows=32, adc_bits=b), input_max=1.0) - ideal).abs().mean())
              for b in (3, 6, 10)]  # fmt: skip
    assert errors[0] > errors[1] > errors[2] > 0


def test_on_crossbars_reads_noisily_and_draws_are_seeded() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(200, 20), torch.randint(0, 3, (200,))
    with on_crossbars(model, Crossbar(noise=0.2), generator=torch.Generator().manual_seed(0)):
        a = model(x)
    assert not torch.allclose(a, model(x))  # the hooks are gone after the block
    draws = accuracy_under_noise(model, x, y, Crossbar(noise=0.5), draws=3, seed=7)
    assert draws == accuracy_under_noise(model, x, y, Crossbar(noise=0.5), draws=3, seed=7) and len(set(draws)) > 1


@pytest.mark.parametrize(
    ("field", "message"),
    [({"cell_bits": 3}, "cell_bits 3 does not divide weight_bits 8: use one of 1, 2, 4, 8"),
     ({"noise": -0.1}, "noise"), ({"adc_bits": 0}, "adc_bits"), ({"rows": 0}, "rows")],
)  # fmt: skip
def test_a_bad_crossbar_is_one_line_naming_the_field(field: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_method({"name": "resna", **field})


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) * 0.6
    y = torch.randint(0, 4, (n,), generator=gen)
    return centers[y] + torch.randn(n, 32, generator=gen), y


def trained(noise: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    x, y = blobs(2048, 1)
    method = build_method({"name": "resna", "noise": 0.4, "train_noise": noise, "rows": 32})
    compress(model, method, [(x[:256], y[:256])], finalize=False)
    fit(model, x, y, TrainConfig(epochs=8, batch_size=64, optimizer="adamw", lr=3e-3, weight_decay=0.0), [method])
    return model.eval()


def test_noise_aware_training_beats_the_same_training_without_noise_on_a_noisy_crossbar() -> None:
    x, y = blobs(1000, 2)
    crossbar = Crossbar(rows=32, noise=0.4)
    plain, aware = (sum(accuracy_under_noise(trained(level), x, y, crossbar, draws=10)) / 10 for level in (0.0, 0.4))
    assert aware > plain + 0.05  # measured over 4 seeds: 0.85-0.86 plain, 0.95 noise-aware


def test_the_crossbar_cost_counts_arrays_reads_and_adc_scaling() -> None:
    from bitsmith.crossbar_cost import (
        ADC8_AREA_MM2,
        ADC8_ENERGY_PJ,
        ADC8_SECONDS,
        ARRAY128_AREA_MM2,
        ARRAY128_READ_PJ,
        crossbar_cost,
    )

    linear = nn.Sequential(nn.Linear(200, 10))  # 200 inputs: 2 row blocks; 2 x 4 slices x 10 = 80 columns: 1 block
    cost = crossbar_cost(linear, torch.rand(1, 200), Crossbar(rows=128))
    assert cost.crossbars == 2
    assert cost.area_mm2 == pytest.approx(2 * (ADC8_AREA_MM2 + ARRAY128_AREA_MM2))
    assert cost.energy_nj == pytest.approx(2 * 2 * (128 * ADC8_ENERGY_PJ + ARRAY128_READ_PJ) / 1e3)  # 2 input phases
    assert cost.latency_us == pytest.approx(2 * 128 * ADC8_SECONDS * 1e6)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))  # 27 inputs, 32 columns: one array, read at 64 positions
    assert crossbar_cost(conv, torch.rand(1, 3, 8, 8), Crossbar(rows=128)).latency_us == pytest.approx(
        2 * 64 * 128 * ADC8_SECONDS * 1e6
    )
    tokens = crossbar_cost(linear, torch.rand(1, 5, 200), Crossbar(rows=128))  # one read per token
    assert tokens.latency_us == pytest.approx(5 * cost.latency_us)
    wide = nn.Sequential(nn.Linear(128, 64))
    two_bit, four_bit = (crossbar_cost(wide, torch.rand(1, 128), Crossbar(cell_bits=c)) for c in (2, 4))
    assert (two_bit.crossbars, four_bit.crossbars) == (4, 2)  # 2 x 4 x 64 = 512 columns vs 2 x 2 x 64 = 256
    six, eight = (crossbar_cost(wide, torch.rand(1, 128), Crossbar(), adc_bits=b) for b in (6, 8))
    assert six.energy_nj < eight.energy_nj and six.area_mm2 < eight.area_mm2 and six.latency_us < eight.latency_us
