"""Post-training quantization baseline: calibrated uniform quantizers on weights and activations.

Not a paper: the standard observer-based PTQ every method is compared with (spec:
``shared/methods/ptq-baselines.md``). Weights are calibrated from themselves; activations (layer
inputs) from calibration batches, observed in float.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from bitsmith.method import Method, register_method
from bitsmith.quant.attention import enable_int8_attention
from bitsmith.quant.layers import attach, input_channel_axis, observe, uniform_weight_quantizer
from bitsmith.quant.residual import quantize_pool_inputs, quantize_residual_adds
from bitsmith.quant.uniform import Bits, Granularity, GroupSize, ObserverName, UniformQuantizer

ResidualAdds = Literal["none", "both", "shortcut"]


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
    residual_adds: ResidualAdds = "none"  # quantize residual adds' inputs: both (ONNX Runtime), shortcut (torchao)
    pool_inputs: bool = False  # quantize the input of every average pool (ONNX Runtime: the last add and the pool)
    int8_attention: bool = False  # both attention matmuls on int8 grids (Hugging Face models; bitsmith.quant.attention)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._layers: list[str] = []
        self._activations: list[str] = []

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
        if self.residual_adds != "none" or self.pool_inputs:
            specs.update(self._quantize_activations(model))
        if self.int8_attention:
            enable_int8_attention(model)
        return specs

    def _quantize_activations(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """The residual adds' and pools' quantizers (``QOutput`` / ``QInput``); a warning when there are none."""
        if self.a_bits is None or self.a_dynamic:
            raise ValueError("ptq: residual_adds and pool_inputs quantize activations statically; set a_bits and "
                             "a_dynamic: false")  # fmt: skip
        bits = self.a_bits

        def activation_q() -> UniformQuantizer:  # static, per tensor
            return UniformQuantizer(bits, self.a_symmetric, "tensor", ch_axis=1, observer=self.a_observer)

        found: dict[str, dict[str, Any]] = {}
        for wanted, quantize, what in (
            (self.residual_adds != "none", lambda: quantize_residual_adds(model, activation_q, self.residual_adds),
             "residual_adds found no add whose two inputs come from a batch norm or an identity shortcut (or the "
             "model cannot be traced with torch.fx)"),
            (self.pool_inputs, lambda: quantize_pool_inputs(model, activation_q), "pool_inputs found no "
             "average pool (nn.AvgPool2d, nn.AdaptiveAvgPool2d)"),
        ):  # fmt: skip
            if wanted:
                added = quantize()
                if not added:
                    warnings.warn(f"ptq: {what}; nothing added", stacklevel=4)
                found.update(added)
        self._activations = list(found)
        return found

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        inputs = [model.get_submodule(name).input_q for name in self._layers]
        observe(model, [*inputs, *(model.get_submodule(name).quantizer for name in self._activations)], batches)
