"""Token routing over precision slices (MoBiQuant's "MoBiRoute"): a ``RoutedQLinear`` reads each token's
weights at the number of slices a small router picks for that token.

The router is a 2-layer MLP on the token's input giving one gate per optional slice (slice 1 is always on).
Gates are nested: slice ``e`` is used only if every slice before it is, so a token's precision is
``1 + (number of leading gates above the threshold)`` slices. The threshold is the runtime operating point
(higher: fewer slices, fewer bits) and can change without re-calibrating. Each layer counts how many tokens
used each precision, so a run reports the router's average bits.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitsmith.nn import QLinear, register_compressed
from bitsmith.quant.slices import SliceQuantizer

TOKEN_SLICES: ContextVar[Tensor | None] = ContextVar("TOKEN_SLICES", default=None)  # set by ``TokenRoutedBlock``


class SliceRouter(nn.Module):
    """``in -> hidden -> slices - 1`` gate logits per token."""

    def __init__(self, in_features: int, slices: int, hidden: int = 16) -> None:
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, slices - 1))
        self.register_buffer("threshold", torch.tensor(0.5))

    @torch.no_grad()
    def slices_used(self, x: Tensor) -> Tensor:
        """Slices per token (``...``, int64 in ``1..slices``) at the current threshold."""
        above = torch.sigmoid(self.net(x)) > self.threshold
        return 1 + torch.cumprod(above.long(), dim=-1).sum(-1)


@register_compressed
class RoutedQLinear(QLinear):
    """A ``QLinear`` with a ``SliceQuantizer`` and a per-token router choosing how many slices each token reads;
    without a router (or with ``routing`` off) it reads the quantizer's ``active`` slices for every token."""

    router: SliceRouter | None

    def _init_compression(self, weight_q: Any, input_q: Any, mask: Tensor | None) -> None:
        super()._init_compression(weight_q, input_q, mask)
        self.router = None
        self.routing = True
        self.follows_tokens = False  # read the slices a model-level token router chose (``TOKEN_SLICES``)
        self.mean_errors: Tensor | None = None  # per slice count, set by calibration (``static_mix``)
        slices = weight_q.slices if isinstance(weight_q, SliceQuantizer) else 0
        self.register_buffer("counts", torch.zeros(slices + 1, dtype=torch.long), persistent=False)

    def attach_router(self, hidden: int) -> SliceRouter:
        q = self.weight_q
        if not isinstance(q, SliceQuantizer):
            raise TypeError("a slice router needs a SliceQuantizer on the layer")
        self.router = SliceRouter(self.in_features, q.slices, hidden).to(self.weight.device)
        return self.router

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "router_hidden": None if self.router is None else self.router.hidden,
                "follows_tokens": self.follows_tokens}  # fmt: skip

    @classmethod
    def from_spec(cls, module: nn.Module, spec: dict[str, Any]) -> nn.Module:
        layer = super().from_spec(module, spec)
        if spec.get("router_hidden"):
            layer.attach_router(int(spec["router_hidden"]))  # type: ignore[union-attr]
        layer.follows_tokens = bool(spec.get("follows_tokens"))  # type: ignore[union-attr]
        return layer

    def slices_used(self, x: Tensor) -> Tensor | None:
        """Slices per token (``x.shape[:-1]``) when routed, None when every token reads ``active`` slices."""
        external = TOKEN_SLICES.get() if self.follows_tokens and self.routing else None
        if external is not None:
            if external.shape != x.shape[:-1]:
                raise RuntimeError(f"token router chose slices for {tuple(external.shape)} tokens, this layer got "
                                   f"{tuple(x.shape[:-1])}")  # fmt: skip
            return external
        return self.router.slices_used(x) if self.router is not None and self.routing else None

    def forward(self, x: Tensor) -> Tensor:
        q = self.weight_q
        if not isinstance(q, SliceQuantizer):
            return super().forward(x)
        x = self.quantize_input(x)
        used = self.slices_used(x)
        if used is None:
            self.counts[q.active] += x[..., 0].numel()
            return F.linear(x, self.effective_weight(), self.bias)
        self.counts += torch.bincount(used.reshape(-1), minlength=q.slices + 1).to(self.counts.device)
        out = x.new_zeros(*x.shape[:-1], self.out_features)
        weight = self.masked_weight()
        for k in used.unique().tolist():
            rows = used == k
            out[rows] = F.linear(x[rows], q.read(weight, k) + (weight - weight.detach()), self.bias)
        return out


def routed_layers(model: nn.Module) -> list[RoutedQLinear]:
    return [m for m in model.modules() if isinstance(m, RoutedQLinear)]


def set_operating_point(model: nn.Module, slices: int | None = None, threshold: float | None = None) -> None:
    """Read every slice layer at ``slices`` (routing off), or route with ``threshold`` (``slices`` None)."""
    layers = routed_layers(model)
    if not layers:
        raise ValueError("this model has no MoBiQuant slice layers (quantize it with the mobiquant method)")
    for layer in layers:
        q: SliceQuantizer = layer.weight_q  # type: ignore[assignment]
        if slices is not None:
            if not 1 <= slices <= q.slices:
                raise ValueError(f"{slices} slices requested; this model stores {q.slices}: use 1..{q.slices}")
            q.active, layer.routing = slices, False
        else:
            layer.routing = layer.router is not None or layer.follows_tokens
            if threshold is not None and layer.router is not None:
                layer.router.threshold.fill_(threshold)
        layer.counts.zero_()


def average_bits(model: nn.Module) -> float | None:
    """Weight bits per weight read since the last ``set_operating_point``: each layer's token-average precision,
    weighted by the layer's weights. None before any forward."""
    total = weighted = 0.0
    for layer in routed_layers(model):
        q: SliceQuantizer = layer.weight_q  # type: ignore[assignment]
        tokens = int(layer.counts.sum())
        if not tokens:
            return None
        bits = float((layer.counts * torch.arange(len(layer.counts))).sum()) / tokens * q.slice_bits
        weighted += bits * layer.weight.numel()
        total += layer.weight.numel()
    return weighted / total if total else None


def static_mix(model: nn.Module, low: int, high: int, fraction: float) -> float:
    """Static mixed precision over the token-routed layers: ``high`` slices for the layers whose calibration
    error drops most per weight from ``low`` to ``high`` (``mean_errors``), until ``fraction`` of their weights
    read ``high``; the others read ``low``. Routing off. Returns the fraction reached."""
    layers = [m for m in routed_layers(model) if m.follows_tokens]
    if not layers or any(m.mean_errors is None for m in layers):
        raise ValueError("static_mix needs token-routed layers calibrated in this process (mean_errors)")
    gain = {id(m): float(m.mean_errors[low - 1] - m.mean_errors[high - 1]) / m.weight.numel() for m in layers}
    budget = fraction * sum(m.weight.numel() for m in layers)
    spent = 0
    for layer in sorted(layers, key=lambda m: -gain[id(m)]):
        high_here = spent + layer.weight.numel() <= budget + layer.weight.numel() / 2
        layer.weight_q.active = high if high_here else low  # type: ignore[union-attr]
        layer.routing = False
        spent += layer.weight.numel() if high_here else 0
        layer.counts.zero_()
    return spent / sum(m.weight.numel() for m in layers)
