"""``QLinear`` / ``QConv2d`` / ``QEmbedding``: a weight quantizer, an input quantizer and a pruning mask around
the float weight; with all three off each computes exactly what the layer it wraps computes."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitsmith.nn.base import as_linear, conv_args, embedding_args, register_compressed
from bitsmith.quant.base import Quantizer, build_quantizer


class QuantizedMixin:
    """Shared state and logic of ``QLinear`` and ``QConv2d``."""

    weight: nn.Parameter
    weight_q: Quantizer | None
    input_q: Quantizer | None
    mask: Tensor | None
    smooth: Tensor | None
    base: ClassVar[type[nn.Module]]

    def _init_compression(self, weight_q: Quantizer | None, input_q: Quantizer | None, mask: Tensor | None) -> None:
        self.weight_q = weight_q
        self.input_q = input_q
        self.register_buffer("mask", None if mask is None else mask.to(torch.bool))  # type: ignore[attr-defined]
        self.register_buffer("smooth", None)  # type: ignore[attr-defined]

    def set_mask(self, mask: Tensor | None) -> None:
        if mask is not None and mask.shape != self.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(self.weight.shape)}")
        self.mask = None if mask is None else mask.to(device=self.weight.device, dtype=torch.bool)

    def masked_weight(self) -> Tensor:
        """The float weight with pruned entries zeroed (what the weight quantizer sees)."""
        return self.weight if self.mask is None else self.weight * self.mask

    def effective_weight(self) -> Tensor:
        """The weight the layer computes with: masked, then fake-quantized."""
        w = self.masked_weight()
        if self.weight_q is not None:
            w = self.weight_q(w)
        return w

    @torch.no_grad()
    def set_smooth(self, scale: Tensor) -> None:
        """SmoothQuant: divide the input by ``scale`` (per input channel) and multiply the weight's input
        columns by it, so the float function is unchanged and the outliers move into the weight."""
        if not isinstance(self, QLinear):
            raise TypeError(f"input smoothing is defined for Linear layers, not {type(self).__name__}")
        if self.smooth is not None:
            raise ValueError("layer is already smoothed; apply smoothquant once")
        self.weight.mul_(scale.to(self.weight)[None, :])
        self.smooth = scale.to(self.weight).clone()

    def quantize_input(self, x: Tensor) -> Tensor:
        if self.smooth is not None:
            x = x / self.smooth
        return x if self.input_q is None else self.input_q(x)

    def spec(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "weight_q": None if self.weight_q is None else self.weight_q.config(),
            "input_q": None if self.input_q is None else self.input_q.config(),
            "mask": self.mask is not None,
            "smooth": self.smooth is not None,
        }

    @classmethod
    def from_spec(cls, module: nn.Module, spec: dict[str, Any]) -> nn.Module:
        weight = as_linear(module).weight if cls is QLinear else module.weight
        mask = torch.ones_like(weight, dtype=torch.bool) if spec.get("mask") else None
        layer = cls.from_float(
            module, build_quantizer(spec.get("weight_q")), build_quantizer(spec.get("input_q")), mask
        )
        if spec.get("smooth"):
            layer.smooth = torch.ones(weight.shape[1], dtype=weight.dtype)  # values come with the state dict
        return layer

    @torch.no_grad()
    def to_float(self) -> nn.Module:
        """A plain torch layer computing with the hard-quantized, masked weight (input quantizer dropped;
        a smoothing scale goes back into the weight, a bias folded by the input quantizer is unfolded)."""
        plain = self._empty_base()
        weight = self.effective_weight().detach()
        bias = getattr(self, "bias", None)
        if self.input_q is not None:
            bias = self.input_q.float_bias(weight, bias)
        if self.smooth is not None:
            weight = weight / self.smooth[None, :]
        plain.weight = nn.Parameter(weight.clone())
        if hasattr(plain, "bias"):
            plain.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        return plain.train(self.training)  # type: ignore[attr-defined]


@register_compressed
class QLinear(QuantizedMixin, nn.Linear):
    """``nn.Linear`` with an optional weight quantizer, input quantizer and pruning mask.

    With all three off it computes exactly what the wrapped ``nn.Linear`` computes.
    """

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight_q: Quantizer | None = None,
        input_q: Quantizer | None = None,
        mask: Tensor | None = None,
    ) -> QLinear:
        """Wrap ``module`` (an ``nn.Linear`` or HF ``Conv1D``), sharing its parameters."""
        linear = as_linear(module)
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        q._init_compression(weight_q, input_q, mask)
        return q.train(module.training)

    def _empty_base(self) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.effective_weight(), self.bias)


@register_compressed
class QConv2d(QuantizedMixin, nn.Conv2d):
    """``nn.Conv2d`` with an optional weight quantizer, input quantizer and pruning mask."""

    @classmethod
    def from_float(
        cls,
        module: nn.Conv2d,
        weight_q: Quantizer | None = None,
        input_q: Quantizer | None = None,
        mask: Tensor | None = None,
    ) -> QConv2d:
        q = cls(**conv_args(module), device="meta")
        q.weight, q.bias = module.weight, module.bias
        q._init_compression(weight_q, input_q, mask)
        return q.train(module.training)

    def _empty_base(self) -> nn.Conv2d:
        return nn.Conv2d(**conv_args(self), device="meta")

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantize_input(x), self.effective_weight(), self.bias)


@register_compressed
class QEmbedding(QuantizedMixin, nn.Embedding):
    """``nn.Embedding`` with an optional weight quantizer (per row: ``ch_axis=0``) and pruning mask.
    Its input is token indices, so it never has an input quantizer."""

    @classmethod
    def from_float(
        cls,
        module: nn.Embedding,
        weight_q: Quantizer | None = None,
        input_q: Quantizer | None = None,
        mask: Tensor | None = None,
    ) -> QEmbedding:
        if input_q is not None:
            raise ValueError("an embedding's input is token indices; it takes no input quantizer")
        q = cls(**embedding_args(module), device="meta")
        q.weight = module.weight
        q._init_compression(weight_q, None, mask)
        return q.train(module.training)

    def _empty_base(self) -> nn.Embedding:
        return nn.Embedding(**embedding_args(self), device="meta")

    def forward(self, x: Tensor) -> Tensor:
        return F.embedding(x, self.effective_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)  # fmt: skip
