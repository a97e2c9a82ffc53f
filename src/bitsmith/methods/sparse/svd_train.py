"""SVD training (Yang et al., CVPR-W 2020): layers trained as ``U diag(|s|) V^T`` with orthogonal singular
vectors and sparse singular values, then cut to low rank.

Spec: ``shared/methods/svd-training.md`` (code: yanghr/SVD_Prune_EDLCV). Each selected Linear / Conv2d
(channel-wise: ``W.reshape(N, C k k)``) becomes an :class:`SVDLayer` initialised by exact SVD of the
trained weight. Training adds

    lam_s * sum_l R(s_l) + lam_o * sum_l (||U^T U - I||_F^2 + ||V^T V - I||_F^2) / r^2

(``R``: ``hoyer`` by default, ``hoyer-square`` or ``l1``). After ``epochs - finetune_epochs`` epochs
each layer keeps the largest singular values holding ``1 - energy`` of ``sum s^2`` (the rest are set
to zero and stay there); fine-tuning continues with ``lam_s = 0``. ``finalize`` replaces every layer by
a ``LowRankLinear`` / ``LowRankConv2d`` of the kept rank (factors ``U sqrt|s|`` and ``sqrt|s| V^T``), or
by the dense layer where that rank would store no fewer weights.

Deviation, stated: the forward pass builds the dense ``U diag(|s|) V^T`` and runs one layer (the same
function and gradients as the code's two factored layers; cheaper for these small models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from bitsmith.method import Method, register_method
from bitsmith.methods.sparse.sparsity import REGULARIZERS
from bitsmith.nn import LowRankConv2d, LowRankLinear, as_linear, conv_args
from bitsmith.swap import swap


class SVDLayer(nn.Module):
    """A Linear or Conv2d whose weight is ``(U * |s| * keep) @ V^T`` (training-time only)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.conv = conv_args(module) if isinstance(module, nn.Conv2d) else None
        weight = module.weight if self.conv is not None else as_linear(module).weight
        self.shape = tuple(weight.shape)
        u, s, vh = torch.linalg.svd(weight.detach().float().reshape(weight.shape[0], -1), full_matrices=False)
        self.u, self.s, self.v = nn.Parameter(u), nn.Parameter(s), nn.Parameter(vh.t().contiguous())
        bias = module.bias if self.conv is not None else as_linear(module).bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("keep", torch.ones_like(s, dtype=torch.bool))

    def weight(self) -> Tensor:
        return ((self.u * (self.s.abs() * self.keep)) @ self.v.t()).reshape(self.shape)

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is None:
            return F.linear(x, self.weight(), self.bias)
        c = self.conv
        return F.conv2d(x, self.weight(), self.bias, c["stride"], c["padding"], c["dilation"], c["groups"])

    def orthogonality(self) -> Tensor:
        """``(||U^T U - I||^2 + ||V^T V - I||^2) / r^2`` (the Gram matrix of the smaller side)."""
        r = self.s.numel()
        eye = torch.eye(r, device=self.s.device)
        return ((self.u.t() @ self.u - eye).pow(2).sum() + (self.v.t() @ self.v - eye).pow(2).sum()) / r**2

    @torch.no_grad()
    def cut(self, energy: float) -> None:
        """Keep the largest singular values holding ``1 - energy`` of the total ``s^2``."""
        power = (self.s.abs() * self.keep).pow(2)
        order = torch.argsort(power, descending=True)
        cumulative = torch.cumsum(power[order], 0)
        count = int((cumulative < (1 - energy) * cumulative[-1]).sum()) + 1
        keep = torch.zeros_like(self.keep)
        keep[order[: min(count, power.numel())]] = True
        self.keep.copy_(keep & self.keep)

    @property
    def rank(self) -> int:
        return int(self.keep.sum())

    @torch.no_grad()
    def dense(self) -> nn.Module:
        """The plain layer computing the same function."""
        if self.conv is None:
            layer: nn.Module = nn.Linear(self.shape[1], self.shape[0], bias=self.bias is not None)
        else:
            layer = nn.Conv2d(**self.conv)
        layer.weight.copy_(self.weight())
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer.to(self.s.device)

    @torch.no_grad()
    def low_rank(self) -> nn.Module:
        """The equivalent ``LowRankLinear`` / ``LowRankConv2d`` of the kept rank, or the dense layer
        when that rank would not store fewer weights (``r (N + C k k) >= N C k k``)."""
        rows, cols = self.shape[0], int(torch.Size(self.shape[1:]).numel())
        if self.rank * (rows + cols) >= rows * cols:
            return self.dense()
        index = torch.nonzero(self.keep).flatten()
        root = self.s.abs()[index].sqrt()
        up, down = self.u[:, index] * root, root[:, None] * self.v[:, index].t()
        if self.conv is None:
            layer = LowRankLinear(self.shape[1], self.shape[0], len(index), bias=self.bias is not None)
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
        else:
            layer = LowRankConv2d(self.conv, len(index))
            layer.up.weight.copy_(up.reshape(self.shape[0], len(index), 1, 1))
            layer.down.weight.copy_(down.reshape(len(index), *self.shape[1:]))
        if self.bias is not None:
            layer.up.bias.copy_(self.bias)
        return layer.to(self.s.device)


@register_method("svd-train")
@dataclass
class SVDTraining(Method):
    """Train in SVD form with orthogonality and singular-value sparsity; finalize to low rank."""

    description = "SVD training: orthogonal U/V, Hoyer-sparse singular values, energy rank cut to low-rank layers"

    regularizer: Literal["hoyer", "hoyer-square", "l1"] = "hoyer"
    lam_s: Annotated[float, Field(ge=0.0)] = 0.01
    lam_o: Annotated[float, Field(ge=0.0)] = 1.0
    energy: Annotated[float, Field(ge=0.0, lt=1.0)] = 1e-2
    finetune_epochs: Annotated[int, Field(ge=0)] = 1

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        specs = swap(model, self.where, lambda name, module, overrides: SVDLayer(module))
        self._layers = list(specs)
        self._cut = False
        return {}  # training-time layers: the low-rank layers appear at finalize

    def layers(self, model: nn.Module) -> dict[str, SVDLayer]:
        return {n: m for n in self._layers if isinstance(m := model.get_submodule(n), SVDLayer)}

    def penalty(self, model: nn.Module, batch: Any) -> Tensor:
        layers = self.layers(model).values()
        if not layers:
            return torch.zeros(())
        total = self.lam_o * sum(layer.orthogonality() for layer in layers)
        if not self._cut and self.lam_s > 0:
            regularizer = REGULARIZERS[self.regularizer]
            total = total + self.lam_s * sum(regularizer(layer.s * layer.keep) for layer in layers)
        return total

    def schedule(self, model: nn.Module, epoch: int, epochs: int) -> bool:
        if epoch == max(1, epochs - self.finetune_epochs) and not self._cut:
            self.cut(model)
        return False

    def cut(self, model: nn.Module) -> None:
        for layer in self.layers(model).values():
            layer.cut(self.energy)
        self._cut = True

    def ranks(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """``(kept rank, full rank)`` per layer."""
        return {n: (layer.rank, layer.s.numel()) for n, layer in self.layers(model).items()}

    def finalize(self, model: nn.Module) -> None:
        if not self._cut:
            self.cut(model)
        layers = {"include": list(self.layers(model)), "types": ["SVDLayer"]}
        swap(model, layers, lambda name, module, overrides: module.low_rank())
