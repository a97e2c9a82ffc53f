"""Area, energy and latency of a model mapped on ReRAM crossbars: the analytic model CF-MESMO's search trades
against accuracy under noise.

Per mapped layer (``D`` unrolled inputs, ``O`` outputs, ``P`` output positions per example; ``K = weight_bits /
cell_bits`` slices, positive and negative weights on separate columns):

* crossbars: ``ceil(D / rows) * ceil(2 K O / rows)`` arrays of ``rows x rows`` cells, one ADC each, shared by its
  columns in turn;
* a read: every crossbar's ``rows`` columns converted, for each of the two input phases (positive and negative
  inputs), once per output position: ``2 P rows`` conversions per crossbar per example;
* latency: the crossbars of a layer convert in parallel, the layers one after another:
  ``sum_layers 2 P rows t_adc``.

Device numbers (ISAAC's 32 nm figures, Shafiee et al., ISCA 2016: an 8-bit ADC at 1.28 GS/s drawing 2 mW in
0.0012 mm^2; a 128 x 128 array of 2-bit cells drawing 0.3 mW in 0.0002 mm^2 for a 100 ns read), scaled as stated:
ADC area and energy per conversion double with every bit (``2^(b - 8)``), its conversion time grows linearly with
the bits (``b / 8``); array area and read energy scale with the cells (``(rows / 128)^2``) and are independent of
the cell's bits. These are a model for comparing designs, not a circuit simulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bitsmith.crossbar import Crossbar, mapped_layers

ADC8_AREA_MM2, ADC8_ENERGY_PJ, ADC8_SECONDS = 0.0012, 2e-3 / 1.28e9 * 1e12, 1 / 1.28e9
ARRAY128_AREA_MM2, ARRAY128_READ_PJ = 0.0002, 0.3e-3 * 100e-9 * 1e12


@dataclass(frozen=True)
class CrossbarCost:
    """A design's cost for one example: chip area (mm^2), energy (nJ) and latency (microseconds)."""

    crossbars: int
    area_mm2: float
    energy_nj: float
    latency_us: float


def layer_positions(model: nn.Module, example: Tensor, names: list[str]) -> dict[str, int]:
    """Output positions per example of each named layer: ``H x W`` for a Conv2d, the tokens for a Linear (1 on a
    vector)."""
    positions: dict[str, int] = {}

    def record(name: str, layer: nn.Module, out: Tensor) -> None:
        channels = out.shape[1] if isinstance(layer, nn.Conv2d) else out.shape[-1]
        positions[name] = out[0].numel() // channels

    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: record(n, m, out)) for n in names]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return positions


def crossbar_cost(model: nn.Module, example: Tensor, crossbar: Crossbar, adc_bits: int = 8) -> CrossbarCost:
    """The analytic cost of running one example of ``model`` with its Linear / Conv2d layers on ``crossbar``
    (``adc_bits``: the ADC's resolution; a design with an ideal ADC is costed at ``adc_bits``)."""
    bits = crossbar.adc_bits or adc_bits
    layers = mapped_layers(model)
    positions = layer_positions(model, example, list(layers))
    slices = crossbar.weight_bits // crossbar.cell_bits
    scale = (crossbar.rows / 128) ** 2
    adc_area, adc_energy = ADC8_AREA_MM2 * 2.0 ** (bits - 8), ADC8_ENERGY_PJ * 2.0 ** (bits - 8)
    adc_seconds = ADC8_SECONDS * bits / 8
    crossbars, energy_pj, seconds = 0, 0.0, 0.0
    for name, layer in layers.items():
        weight = layer.weight.reshape(layer.weight.shape[0], -1)
        arrays = math.ceil(weight.shape[1] / crossbar.rows) * math.ceil(2 * slices * weight.shape[0] / crossbar.rows)
        reads = 2 * positions.get(name, 0)  # two input phases per output position
        crossbars += arrays
        energy_pj += arrays * reads * (crossbar.rows * adc_energy + ARRAY128_READ_PJ * scale)
        seconds += reads * crossbar.rows * adc_seconds
    area = crossbars * (adc_area + ARRAY128_AREA_MM2 * scale)
    return CrossbarCost(crossbars, area, energy_pj / 1e3, seconds * 1e6)
