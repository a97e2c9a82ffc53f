"""A Hadamard rotation in front of each selected linear layer (QuaRot-style; SQAP-VLA's quantizer change for token
pruning): the layer computes ``(x R)(W R)^T``, the same function in floating point, with an orthonormal block-diagonal
Hadamard ``R`` that spreads an outlier channel of the activation and an outlier column of the weight over ``block``
channels, so a per-tensor activation quantizer and a per-row weight quantizer lose less. List it *before* the
quantizing method (``[hadamard, ptq]``): the quantizer then sees the rotated input and weight (``<layer>.linear``).

SQAP-VLA uses it so that the quantized model's attention, which its token pruning reads, stays closer to the
unquantized one; ``where`` picks the layers (e.g. ``include: ["*.attn.qkv"]`` for the attention projections only).

Deviation, stated: the rotation is applied online in front of the layer (one ``block x block`` matmul per token and
layer), not fused into the previous layer as QuaRot does for RMSNorm models: a LayerNorm's affine and mean removal
do not commute with ``R``. ``strip`` folds ``R^T`` back into the quantized weight exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field
from torch import nn

from bitsmith.method import Method, register_method
from bitsmith.nn import QuantizedMixin, RotatedLinear
from bitsmith.swap import swap

LARGEST = 256  # the default block: the largest power of two dividing the inputs, at most this


def default_block(features: int) -> int:
    """The largest power of two dividing ``features``, at most ``LARGEST``."""
    return min(features & -features, LARGEST)


@register_method("hadamard")
@dataclass
class Hadamard(Method):
    """Rotate each selected linear layer's input and weight by a block-diagonal Hadamard; list before ``ptq``."""

    description = "Hadamard rotation of linear layers' inputs (QuaRot-style, SQAP-VLA's quantizer change)"

    block: Annotated[int, Field(ge=0)] = 0  # columns per Hadamard block (a power of two); 0: the largest dividing

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        def wrap(name: str, module: nn.Module, overrides: dict[str, Any]) -> nn.Module:
            if isinstance(module, QuantizedMixin):
                raise ValueError(f"hadamard: layer {name!r} is already quantized; list hadamard before the "
                                 "quantizing method in `methods` (e.g. [hadamard, ptq])")  # fmt: skip
            if type(module) is not nn.Linear:  # convolutions, and layers already rotated, stay
                return module
            block = int(overrides.get("block", self.block)) or default_block(module.in_features)
            if block & (block - 1):
                raise ValueError(f"hadamard: block {block}: a Hadamard block is a power of two (2, 4, 8, ...); "
                                 "or 0 for the largest dividing each layer's inputs")  # fmt: skip
            if module.in_features % block:
                raise ValueError(f"hadamard: block {block} does not divide layer {name!r}'s {module.in_features} "
                                 "inputs; choose a power of two dividing it, or 0 for the largest")  # fmt: skip
            return RotatedLinear.around(module, block)

        specs = swap(model, self.where, wrap)
        return {n: s for n, s in specs.items() if s.get("type") == RotatedLinear.__name__}
