"""Bit-slice sparsity (Zhang et al., EMC^2 2019): an L1 on the 2-bit slices of fixed-point weights, for
ReRAM crossbars whose ADC resolution is set by how many cells of a bit line are non-zero.

Spec: ``shared/methods/bitslice.md`` (code: zjysteven/bitslice_sparsity). A weight tensor with
dynamic fixed-point scale ``s = ceil(log2 max|W|)`` has the magnitude code ``x = round(|w| / 2^(s-8))``,
an 8-bit magnitude in [0, 255] (the sign is a separate crossbar), split into four full 2-bit slices,
most significant first: ``b1 = floor(x / 64)``, ``b2 = floor((x - 64 b1) / 16)``, ... Floor and round
pass gradients straight through and earlier slices are detached in the later subtractions, as in the
code. The weights are quantized on that grid (a ``UniformQuantizer`` with the fixed step ``2^(s-8)``,
magnitudes clamped to 255). ``prepare`` magnitude-prunes ``|w| < prune_threshold`` (masks frozen).
Training adds the official normalisation, one mean over all slices of all selected weights:

    alpha * sum_l sum_k sum |slice_k(W_l)| / (K * #W)

``regularizer: l1`` is the plain-L1 baseline on the same scale, ``alpha * sum_l sum |W_l| / step_l / #W``
(the code's L1 on the weights, in code units so one alpha compares the two). ``slice_sparsity``
reports the fraction of zero entries per slice over all selected weights. The mapping (step, code, slices) is
``bitsmith.crossbar``'s, the ReRAM crossbar model ReSNA trains against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.crossbar import bit_slices, power_of_two_step
from bitsmith.method import Method, register_method
from bitsmith.quant.layers import attach
from bitsmith.quant.uniform import UniformQuantizer

MAGNITUDE_BITS = 8  # four full 2-bit slices


@register_method("bitslice")
@dataclass
class BitSlice(Method):
    """8-bit fixed-point weights, magnitude pruning, and an L1 on their bit slices (or on the weights)."""

    description = "bit-slice sparsity: L1 on the 2-bit slices of 8-bit fixed-point weights (ReRAM), or plain L1"

    regularizer: Literal["bitslice", "l1"] = "bitslice"
    alpha: Annotated[float, Field(ge=0.0)] = 0.5
    slice_bits: Annotated[int, Field(ge=1, le=7)] = 2
    prune_threshold: Annotated[float, Field(ge=0.0)] = 0.01

    def _weight_q(self, name: str, layer: nn.Module, overrides: dict[str, Any]) -> UniformQuantizer:
        # sign + 8-bit magnitude: codes in [-256, 255] on the step 2^(s-8)
        return UniformQuantizer(MAGNITUDE_BITS + 1, True, "tensor", step="fixed", scale=power_of_two_step(layer.weight))

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        specs = attach(model, self.where, self._weight_q, None)
        self._layers = list(specs)
        for name in self._layers:
            layer = model.get_submodule(name)
            layer.set_mask(layer.weight.detach().abs() >= self.prune_threshold)
        return {name: model.get_submodule(name).spec() for name in self._layers}

    def _step(self, layer: nn.Module) -> float:
        return float(layer.weight_q.scale)

    def penalty(self, model: nn.Module, batch: Any) -> Tensor:
        if self.alpha == 0:
            return torch.zeros(())
        total, count = torch.zeros(()), 0
        for name in self._layers:
            layer = model.get_submodule(name)
            weight = layer.masked_weight()
            count += weight.numel()
            if self.regularizer == "l1":
                total = total + weight.abs().sum() / self._step(layer)
            else:
                slices = bit_slices(weight, self._step(layer), self.slice_bits)
                total = total + sum(s.abs().sum() for s in slices) / len(slices)
        return self.alpha * total / count

    @torch.no_grad()
    def slice_sparsity(self, model: nn.Module) -> list[float]:
        """Fraction of zero entries in each slice over all selected weights, most significant first."""
        zeros: list[float] = []
        total = 0
        for name in self._layers:
            layer = model.get_submodule(name)
            slices = bit_slices(layer.masked_weight(), self._step(layer), self.slice_bits)
            counts = [float((s == 0).sum()) for s in slices]
            zeros = counts if not zeros else [a + b for a, b in zip(zeros, counts, strict=True)]
            total += layer.weight.numel()
        return [z / total for z in zeros]
