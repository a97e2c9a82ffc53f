"""Round-to-nearest weight-only quantization per group: the floor every weight-only method must beat.

No calibration data; scales from each group's min/max (spec: ``shared/methods/ptq-baselines.md``). A group size
that does not divide a layer's inputs is an error (as GPTQ and AWQ), unless ``per_channel_fallback`` lets those
layers take per-channel scales (with a warning naming each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from bitsmith.method import Method, register_method
from bitsmith.quant.gguf_grid import GgufGridName
from bitsmith.quant.layers import attach, check_group, grouped_weight_quantizer, uniform_weight_quantizer
from bitsmith.quant.uniform import Bits, GroupSize, UniformQuantizer


@register_method("rtn")
@dataclass
class RTN(Method):
    """Weight-only round-to-nearest with per-group scales (asymmetric by default)."""

    description = "weight-only round-to-nearest per group, no calibration data"

    bits: Bits = 4
    group_size: GroupSize = 128
    symmetric: bool = False
    float_zero: bool = False  # grid min + scale * k (llama.cpp Q4_1 / HQQ style) instead of an integer zero point
    per_channel_fallback: bool = False  # layers the group does not divide: per-channel scales instead of an error
    grid: GgufGridName | None = None  # a llama.cpp GGUF grid (q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q6_k)

    def _weight_q(self, name: str, layer: nn.Module, overrides: dict[str, Any]) -> UniformQuantizer:
        c = self.layer_config(overrides)
        if c["grid"] is not None:
            return grouped_weight_quantizer("rtn", name, layer, c["bits"], c["group_size"], c["symmetric"], c["grid"])
        if not c["per_channel_fallback"]:
            check_group("rtn", name, layer, c["group_size"], ", exclude the layer, or set per_channel_fallback: true")
        return uniform_weight_quantizer(name, layer, c["bits"], "group", c["group_size"], c["symmetric"], "minmax",
                                        float_zero=c["float_zero"])  # fmt: skip

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        return attach(model, self.where, self._weight_q, None)
