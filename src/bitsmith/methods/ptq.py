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
from bitsmith.quant.layers import attach, input_channel_axis, observe, uniform_weight_quantizer
from bitsmith.quant.residual import quantize_residual_adds
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

    def __post_init__(self) -> None:
        super().__post_init__()
        self._layers: list[str] = []
        self._outputs: list[str] = []

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
        if self.residual_adds != "none":
            specs.update(self._quantize_residual_adds(model))
        return specs

    def _quantize_residual_adds(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        if self.a_bits is None or self.a_dynamic:
            raise ValueError("ptq: residual_adds quantizes activations statically; set a_bits and a_dynamic: false")
        outputs = quantize_residual_adds(
            model,
            lambda: UniformQuantizer(self.a_bits, self.a_symmetric, "tensor", ch_axis=1, observer=self.a_observer),
            self.residual_adds,
        )
        if not outputs:
            warnings.warn("ptq: residual_adds found no add whose two inputs come from a batch norm or an identity "
                          "shortcut (or the model cannot be traced with torch.fx); nothing added", stacklevel=3)  # fmt: skip
        self._outputs = list(outputs)
        return outputs

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        inputs = [model.get_submodule(name).input_q for name in self._layers]
        observe(model, [*inputs, *(model.get_submodule(name).output_q for name in self._outputs)], batches)
