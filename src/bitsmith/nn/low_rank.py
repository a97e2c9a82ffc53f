"""``LowRankLinear`` / ``LowRankConv2d``: a layer factored through a rank-``r`` bottleneck (two smaller layers)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.nn.base import as_linear, conv_args, register_compressed


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


def check_rank(rank: object, limit: int) -> None:
    """A rank read from a spec or a checkpoint: an integer in ``[1, limit]``, checked before anything is allocated."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"rank must be an integer in [1, {limit}], got {rank!r}")


@register_compressed
class LowRankLinear(LowRankMixin, nn.Module):
    """``nn.Linear(in, out)`` factored as ``Linear(in, r, bias=False)`` then ``Linear(r, out)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        check_rank(rank, min(in_features, out_features))
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


@register_compressed
class LowRankConv2d(LowRankMixin, nn.Module):
    """``nn.Conv2d`` factored as a ``r``-channel conv with the original kernel, then a 1x1 conv."""

    def __init__(self, conv_args: dict[str, Any], rank: int) -> None:
        super().__init__()
        if conv_args["groups"] != 1:
            raise ValueError("LowRankConv2d supports groups=1 convolutions only")
        kernel = conv_args["kernel_size"]
        fan_in = conv_args["in_channels"] * (kernel * kernel if isinstance(kernel, int) else math.prod(kernel))
        check_rank(rank, min(conv_args["out_channels"], fan_in))
        self.down = nn.Conv2d(**{**conv_args, "out_channels": rank, "bias": False})
        self.up = nn.Conv2d(rank, conv_args["out_channels"], 1, bias=conv_args["bias"])

    @classmethod
    def from_float(cls, module: nn.Conv2d, rank: int) -> LowRankConv2d:
        layer = cls(conv_args(module), rank)
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
        args = conv_args(self.down)
        dense = nn.Conv2d(**{**args, "out_channels": self.up.out_channels, "bias": self.up.bias is not None})
        up = self.up.weight.flatten(1)  # (out, r)
        dense.weight.copy_((up @ self.down.weight.flatten(1)).reshape(dense.weight.shape))
        if self.up.bias is not None:
            dense.bias.copy_(self.up.bias)
        return dense
