"""A linear layer that sees its input rotated by an orthonormal block-diagonal Hadamard matrix ``R`` (QuaRot-style,
the quantizer change of SQAP-VLA): ``linear(x R)`` with the weight stored as ``W R``, the same function in floating
point (``x R (W R)^T = x W^T``), while an outlier channel of ``x`` or a column of ``W`` is spread over ``block``
channels before a quantizer sees it. The inner ``linear`` is an ordinary ``nn.Linear`` that a later quantizing method
replaces (``<name>.linear``); ``to_float`` folds ``R^T`` back into its (quantized) weight, exactly."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.nn.base import register_compressed
from bitsmith.quant.lift import rotate


@register_compressed
class RotatedLinear(nn.Module):
    """``linear(rotate(x))``; build with :meth:`around` to rotate a trained layer's weight."""

    def __init__(self, linear: nn.Module, block: int) -> None:
        super().__init__()
        self.linear, self.block = linear, block

    @classmethod
    @torch.no_grad()
    def around(cls, linear: nn.Linear, block: int) -> RotatedLinear:
        """``linear`` with its weight rotated to ``W R`` (in place), wrapped."""
        linear.weight.copy_(rotate(linear.weight, block))
        return cls(linear, block)

    @property
    def in_features(self) -> int:
        return int(self.linear.in_features)

    @property
    def out_features(self) -> int:
        return int(self.linear.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(rotate(x, self.block))

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "block": self.block}

    @classmethod
    def from_spec(cls, module: nn.Module, spec: dict[str, Any]) -> RotatedLinear:
        return cls(module, int(spec["block"]))  # the checkpoint's state holds the rotated weight

    @torch.no_grad()
    def to_float(self) -> nn.Linear:
        inner = self.linear.to_float() if hasattr(self.linear, "to_float") else self.linear
        plain = nn.Linear(inner.in_features, inner.out_features, bias=inner.bias is not None)
        plain.weight.copy_(rotate(inner.weight, self.block, inverse=True))
        if inner.bias is not None:
            plain.bias.copy_(inner.bias)
        return plain.to(inner.weight)
