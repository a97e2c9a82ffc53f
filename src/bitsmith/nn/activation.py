"""Fake-quantizers on the output or the input of a layer without weights (PTQ's ``residual_adds`` and
``pool_inputs``)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from bitsmith.nn.base import register_compressed
from bitsmith.quant.base import Quantizer, build_quantizer


class QuantizedActivation(nn.Module):
    """A layer without children (a batch norm, an identity shortcut, a pooling layer) with a fake-quantizer on its
    output (:class:`QOutput`) or its input (:class:`QInput`), for PTQ's ``residual_adds`` and ``pool_inputs``:
    they give an integer backend 8-bit tensors where a layer's output or a pool's input would otherwise be float.
    Wrapping a childless layer keeps every quantized layer's name."""

    def __init__(self, inner: nn.Module, quantizer: Quantizer | None = None) -> None:
        super().__init__()
        self.inner, self.quantizer = inner, quantizer

    @classmethod
    def from_spec(cls, module: nn.Module, spec: dict[str, Any]) -> QuantizedActivation:
        return cls(module, build_quantizer(spec.get("quantizer")))

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "quantizer": None if self.quantizer is None else self.quantizer.config()}

    def quantize(self, x: Tensor) -> Tensor:
        return x if self.quantizer is None else self.quantizer(x)

    def to_float(self) -> nn.Module:
        """The inner layer (the quantizer dropped, as ``strip`` drops input quantizers)."""
        return self.inner


@register_compressed
class QOutput(QuantizedActivation):
    """``quantizer(inner(x))``: PTQ's ``residual_adds`` puts one on each input of a residual add."""

    def forward(self, x: Tensor) -> Tensor:
        return self.quantize(self.inner(x))


@register_compressed
class QInput(QuantizedActivation):
    """``inner(quantizer(x))``: PTQ's ``pool_inputs`` puts one in front of each average pool."""

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(self.quantize(x))
