"""Compressed modules: ``QLinear`` / ``QConv2d`` (quantizers + mask around the float weight) and
``LowRankLinear`` / ``LowRankConv2d`` (two factors), plus ``strip()`` back to plain torch modules."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitsmith.quant.base import Quantizer, build_quantizer

COMPRESSED: dict[str, type[nn.Module]] = {}


def _compressed(cls: type[nn.Module]) -> type[nn.Module]:
    COMPRESSED[cls.__name__] = cls
    return cls


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face GPT-2 style ``Conv1D``: a linear layer with its weight stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` itself if it is an ``nn.Linear``, or an equivalent ``nn.Linear`` for an HF ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module
    if is_hf_conv1d(module):
        in_features, out_features = module.weight.shape
        linear = nn.Linear(in_features, out_features, device="meta")
        linear.weight = nn.Parameter(module.weight.detach().t().contiguous())
        linear.bias = module.bias
        return linear
    raise TypeError(f"expected nn.Linear or a Hugging Face Conv1D, got {type(module).__name__}")


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


@_compressed
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


@_compressed
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
        q = cls(**_conv_args(module), device="meta")
        q.weight, q.bias = module.weight, module.bias
        q._init_compression(weight_q, input_q, mask)
        return q.train(module.training)

    def _empty_base(self) -> nn.Conv2d:
        return nn.Conv2d(**_conv_args(self), device="meta")

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantize_input(x), self.effective_weight(), self.bias)


@_compressed
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
        q = cls(**_embedding_args(module), device="meta")
        q.weight = module.weight
        q._init_compression(weight_q, None, mask)
        return q.train(module.training)

    def _empty_base(self) -> nn.Embedding:
        return nn.Embedding(**_embedding_args(self), device="meta")

    def forward(self, x: Tensor) -> Tensor:
        return F.embedding(x, self.effective_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)  # fmt: skip


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


@_compressed
class QOutput(QuantizedActivation):
    """``quantizer(inner(x))``: PTQ's ``residual_adds`` puts one on each input of a residual add."""

    def forward(self, x: Tensor) -> Tensor:
        return self.quantize(self.inner(x))


@_compressed
class QInput(QuantizedActivation):
    """``inner(quantizer(x))``: PTQ's ``pool_inputs`` puts one in front of each average pool."""

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(self.quantize(x))


def _embedding_args(embedding: nn.Embedding) -> dict[str, Any]:
    return {
        "num_embeddings": embedding.num_embeddings, "embedding_dim": embedding.embedding_dim,
        "padding_idx": embedding.padding_idx, "max_norm": embedding.max_norm, "norm_type": embedding.norm_type,
        "scale_grad_by_freq": embedding.scale_grad_by_freq, "sparse": embedding.sparse,
    }  # fmt: skip


def _conv_args(conv: nn.Conv2d) -> dict[str, Any]:
    return {
        "in_channels": conv.in_channels, "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding,
        "dilation": conv.dilation, "groups": conv.groups, "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }  # fmt: skip


def _svd_factors(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``matrix (out, in) ~= up (out, r) @ down (r, in)``, singular values split evenly."""
    u, s, vh = torch.linalg.svd(matrix.detach().float(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


class LowRankMixin:
    """A layer computed as ``up(down(x))`` through a rank-``r`` bottleneck."""

    down: nn.Module
    up: nn.Module

    @property
    def rank(self) -> int:
        return self.down.weight.shape[0]  # type: ignore[union-attr]

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "rank": self.rank}

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def to_float(self, merge: bool = False) -> nn.Module:
        """``nn.Sequential(down, up)``, or one dense layer with ``merge=True``."""
        if merge:
            return self.merged()  # type: ignore[attr-defined]
        return nn.Sequential(self.down, self.up)


@_compressed
class LowRankLinear(LowRankMixin, nn.Module):
    """``nn.Linear(in, out)`` factored as ``Linear(in, r, bias=False)`` then ``Linear(r, out)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_float(cls, module: nn.Module, rank: int) -> LowRankLinear:
        """Best rank-``r`` approximation of ``module`` (truncated SVD)."""
        linear = as_linear(module)
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
        up, down = _svd_factors(linear.weight, rank)
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
            if linear.bias is not None:
                layer.up.bias.copy_(linear.bias)
        return layer.to(linear.weight.device)

    @classmethod
    def from_spec(cls, module: nn.Module, spec: dict[str, Any]) -> LowRankLinear:
        return cls.from_float(module, spec["rank"])

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        dense = nn.Linear(self.down.in_features, self.up.out_features, bias=self.up.bias is not None)
        dense.weight.copy_(self.up.weight @ self.down.weight)
        if self.up.bias is not None:
            dense.bias.copy_(self.up.bias)
        return dense


@_compressed
class LowRankConv2d(LowRankMixin, nn.Module):
    """``nn.Conv2d`` factored as a ``r``-channel conv with the original kernel, then a 1x1 conv."""

    def __init__(self, conv_args: dict[str, Any], rank: int) -> None:
        super().__init__()
        if conv_args["groups"] != 1:
            raise ValueError("LowRankConv2d supports groups=1 convolutions only")
        self.down = nn.Conv2d(**{**conv_args, "out_channels": rank, "bias": False})
        self.up = nn.Conv2d(rank, conv_args["out_channels"], 1, bias=conv_args["bias"])

    @classmethod
    def from_float(cls, module: nn.Conv2d, rank: int) -> LowRankConv2d:
        layer = cls(_conv_args(module), rank)
        out = module.out_channels
        up, down = _svd_factors(module.weight.reshape(out, -1), rank)
        with torch.no_grad():
            layer.up.weight.copy_(up.reshape(out, rank, 1, 1))
            layer.down.weight.copy_(down.reshape(rank, *module.weight.shape[1:]))
            if module.bias is not None:
                layer.up.bias.copy_(module.bias)
        return layer.to(module.weight.device)

    @classmethod
    def from_spec(cls, module: nn.Module, spec: dict[str, Any]) -> LowRankConv2d:
        return cls.from_float(module, spec["rank"])  # type: ignore[arg-type]

    @torch.no_grad()
    def merged(self) -> nn.Conv2d:
        args = _conv_args(self.down)
        dense = nn.Conv2d(**{**args, "out_channels": self.up.out_channels, "bias": self.up.bias is not None})
        up = self.up.weight.flatten(1)  # (out, r)
        dense.weight.copy_((up @ self.down.weight.flatten(1)).reshape(dense.weight.shape))
        if self.up.bias is not None:
            dense.bias.copy_(self.up.bias)
        return dense


def is_compressed(module: nn.Module) -> bool:
    return isinstance(module, (QuantizedMixin, LowRankMixin)) or type(module) in COMPRESSED.values()


def compressed_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer name: spec}`` of every compressed module, parents before children."""
    return {name: m.spec() for name, m in model.named_modules() if is_compressed(m)}  # type: ignore[union-attr]


def build_compressed(module: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """The compressed module described by ``spec``, built around the plain ``module``."""
    kind = spec.get("type")
    if kind not in COMPRESSED:
        raise ValueError(f"unknown compressed layer type {kind!r}; known: {sorted(COMPRESSED)}")
    return COMPRESSED[kind].from_spec(module, spec)  # type: ignore[attr-defined]


@torch.no_grad()
def strip(model: nn.Module, merge_low_rank: bool = False) -> nn.Module:
    """Replace every compressed module by plain torch modules (in place; returns ``model``).

    Quantized layers become ``nn.Linear`` / ``nn.Conv2d`` holding the hard-quantized, masked weight;
    input quantizers are dropped. Low-rank layers become ``nn.Sequential(down, up)`` (or one merged
    dense layer with ``merge_low_rank=True``).
    """
    from bitsmith.swap import set_submodule

    names = [name for name, m in model.named_modules() if is_compressed(m)]
    for name in sorted(names, key=lambda n: -n.count(".")):  # children first
        module = model.get_submodule(name) if name else model
        low_rank = isinstance(module, LowRankMixin)
        plain = module.to_float(merge_low_rank) if low_rank else module.to_float()  # type: ignore[union-attr]
        if not name:
            return plain
        set_submodule(model, name, plain)
    return model
