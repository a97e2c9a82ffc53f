"""Post-training quantization baseline: calibrated uniform quantizers on weights and activations.

Not a paper: the standard observer-based PTQ every method is compared with (spec:
``shared/methods/ptq-baselines.md``). Weights are calibrated from themselves; activations (layer
inputs) from calibration batches, observed in float.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from bitsmith.method import Method, register_method
from bitsmith.quant.layers import attach, input_channel_axis, observe_inputs, uniform_weight_quantizer
from bitsmith.quant.uniform import Bits, Granularity, GroupSize, ObserverName, UniformQuantizer


@register_method("ptq")
@dataclass
class PTQ(Method):
    """Uniform PTQ. ``w_bits`` / ``a_bits`` of ``None`` leave that side in float."""

    description = "post-training uniform quantization of weights and activations (any observer, any granularity)"

    w_bits: Bits | None = 8
    a_bits: Bits | None = 8
    w_granularity: Granularity = "channel"
    w_group_size: GroupSize | None = 128
    w_symmetric: bool = True
    w_observer: ObserverName = "minmax"
    a_granularity: Granularity = "tensor"
    a_symmetric: bool = False
    a_observer: ObserverName = "minmax"
    a_dynamic: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._layers: list[str] = []

    def _weight_q(self, name: str, layer: nn.Module, overrides: dict[str, Any]) -> UniformQuantizer | None:
        c = self.layer_config(overrides)
        if c["w_bits"] is None:
            return None
        return uniform_weight_quantizer(
            name, layer, c["w_bits"], c["w_granularity"], c["w_group_size"], c["w_symmetric"], c["w_observer"]
        )

    def _input_q(self, name: str, layer: nn.Module, overrides: dict[str, Any]) -> UniformQuantizer | None:
        c = self.layer_config(overrides)
        if c["a_bits"] is None:
            return None
        granularity = c["a_granularity"]
        return UniformQuantizer(
            c["a_bits"], c["a_symmetric"], granularity, ch_axis=input_channel_axis(layer),
            observer=c["a_observer"], dynamic=c["a_dynamic"] or granularity == "token",
        )  # fmt: skip

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        specs = attach(model, self.where, self._weight_q, self._input_q)
        self._layers = list(specs)
        return specs

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        observe_inputs(model, self._layers, batches)
