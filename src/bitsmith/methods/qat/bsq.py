"""BSQ (Yang et al., ICLR 2021): bit-level sparsity for mixed-precision quantization.

Spec: ``shared/methods/bsq.md``. Each selected layer's weight becomes ``bits`` positive and negative
bit planes with relaxed values in [0, 2] (``BitPlaneQuantizer``); the forward pass is always an exact
sign-magnitude quantized weight (straight-through gradient). Training adds the memory-aware bit-level
group Lasso

    alpha * sum_l (#W_l * n_l / #W_total) * sum_b ||[P_b; N_b]||_2

which drives whole bit planes to zero. Every ``adjust_every`` epochs (and before the fine-tune) the
planes are re-quantized to exact {0, 1} values (an overflow adds an MSB while under ``start_bits``)
and all-zero most / least significant planes are dropped, so each layer ends at its own precision.
The last ``finetune_epochs`` epochs train at that fixed precision without the regulariser: by
default as the paper's ``cifar_finetune.py`` does (``finetune: fixed``), with each layer's weight back
in float behind a quantizer at the found precision and frozen step whose gradient passes straight
through (identity: zero codes and clipped weights keep learning); with ``finetune: planes``, on the
bit planes themselves (an ablation). The planes are clamped to [0, 2] after every optimizer step
(the ``after_step`` hook), as the official code does, so every forward pass and every precision
adjustment reads clamped planes.

Deviations, stated: the layer's scale is the value of one LSB (``step``), with its gradient rescaled
so SGD moves weights as on BSQ's ``s``; activations use a dynamic per-tensor min-max quantizer
(``a_bits``, 8 by default here; the paper's CIFAR runs use 4 bits after ReLU6/PACT).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.method import Method, register_method
from bitsmith.nn import QuantizedMixin
from bitsmith.quant.bitplane import BitPlaneQuantizer, SignMagnitude
from bitsmith.quant.layers import attach, input_channel_axis
from bitsmith.quant.roundclamp import RoundClampQuantizer
from bitsmith.quant.uniform import Bits, UniformQuantizer

Q = TypeVar("Q")


def layers_with(model: nn.Module, names: Iterable[str], kind: type[Q]) -> list[tuple[str, QuantizedMixin, Q]]:
    """``(name, layer, quantizer)`` of the named layers whose weight quantizer is a ``kind``."""
    out = []
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, QuantizedMixin) and isinstance(layer.weight_q, kind):
            out.append((name, layer, layer.weight_q))
    return out


def bitplane_layers(model: nn.Module, names: Iterable[str]) -> list[tuple[str, QuantizedMixin, BitPlaneQuantizer]]:
    """The named layers with a bit-plane weight quantizer."""
    return layers_with(model, names, BitPlaneQuantizer)


def group_lasso(q: BitPlaneQuantizer) -> Tensor:
    """``sum_b ||[P_b; N_b]||_2`` over the bit planes of one layer."""
    planes = torch.cat([q.pos.flatten(1), q.neg.flatten(1)], dim=1)
    return (planes.pow(2).sum(dim=1) + 1e-8).sqrt().sum()


@torch.no_grad()
def adjust_precision(q: BitPlaneQuantizer, max_bits: int, threshold: float = 0.0) -> None:
    """Re-quantize to exact planes (adding an MSB on overflow below ``max_bits``), then drop all-zero
    (density <= ``threshold``) most and least significant planes; never below 1 bit."""
    if q.integer_value().abs().max() > q.levels + 0.5 and q.bits < max_bits:
        q.add_msb_()
    q.requantize_()
    while q.bits > 1 and float(q.plane_density()[-1]) <= threshold:
        q.drop_msb_()
    while q.bits > 1 and float(q.plane_density()[0]) <= threshold:
        q.drop_lsb_()


@torch.no_grad()
def fix_scheme(model: nn.Module, names: Iterable[str]) -> None:
    """BSQ's fixed-scheme fine-tune: each bit-plane layer's weight becomes the float weight it encodes,
    quantized by a round-clamp STE quantizer at the found precision and (frozen) step."""
    for _, layer, q in bitplane_layers(model, names):
        fixed = RoundClampQuantizer(q.bits, gradient="identity")
        fixed.step = q.step.detach().clone()
        layer.weight.copy_(q(layer.weight))
        layer.weight.requires_grad_(True)
        layer.weight_q = fixed


class BitLevelMethod(Method):
    """Shared by the bit-level methods: ``_weight_q`` (the subclass's) on the selected layers, a dynamic
    per-tensor ``a_bits`` input quantizer (or none), and the list of those layers."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._layers: list[str] = []

    def _weight_q(self, name: str, layer: nn.Module, overrides: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _input_q(self, name: str, layer: nn.Module, overrides: dict[str, Any]) -> UniformQuantizer | None:
        bits = self.layer_config(overrides)["a_bits"]
        if bits is None:
            return None
        return UniformQuantizer(bits, False, "tensor", ch_axis=input_channel_axis(layer), dynamic=True)

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        specs = attach(model, self.where, self._weight_q, self._input_q)
        self._layers = list(specs)
        return specs


@dataclass
class PrecisionSearch(BitLevelMethod):
    """Shared by BSQ and MSQ: a sparsity strength ``alpha`` from ``start_bits``, precision adjusted every
    ``adjust_every`` epochs (a plane or LSB whose density is at most ``threshold`` goes), and the last
    ``finetune_epochs`` epochs at the found precision without the regulariser (``_frozen``)."""

    alpha: Annotated[float, Field(ge=0.0)] = 5e-3
    start_bits: Annotated[int, Field(ge=1, le=16)] = 8
    a_bits: Bits | None = 8
    adjust_every: Annotated[int, Field(ge=1)] = 1
    threshold: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    finetune_epochs: Annotated[int, Field(ge=0)] = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._frozen = False

    def adjusts_after(self, epoch: int, epochs: int) -> bool:
        """Whether the precision is adjusted after ``epoch``: every ``adjust_every`` epochs and when the
        fine-tune starts, never during it."""
        return not self._frozen and (epoch % self.adjust_every == 0 or epoch == epochs - self.finetune_epochs)

    def resume(self, model: nn.Module, epoch: int, epochs: int) -> None:
        self._frozen = self.finetune_epochs > 0 and epoch >= epochs - self.finetune_epochs

    def precision(self, model: nn.Module) -> dict[str, int]:
        """Bits per layer now (bit planes, round-clamp codes, or BSQ's fixed scheme in the fine-tune)."""
        return {name: q.bits for name, _, q in layers_with(model, self._layers, SignMagnitude)}


@register_method("bsq")
@dataclass
class BSQ(PrecisionSearch):
    """Trainable bit planes with a bit-level group-Lasso; pair it with a ``train`` section."""

    description = "BSQ: bit-plane weights, bit-level group Lasso, periodic precision adjustment (mixed precision)"

    finetune: Literal["fixed", "planes"] = "fixed"

    def _weight_q(self, name: str, layer: nn.Module, overrides: dict[str, Any]) -> BitPlaneQuantizer:
        bits = self.layer_config(overrides)["start_bits"]
        layer.weight.requires_grad_(False)  # the planes are the weight now
        return BitPlaneQuantizer(bits).calibrate_(layer.masked_weight())  # type: ignore[return-value]

    def penalty(self, model: nn.Module, batch: Any) -> Tensor:
        layers = bitplane_layers(model, self._layers)
        if self._frozen or self.alpha == 0 or not layers:
            return torch.zeros(())
        total = sum(q.pos[0].numel() for _, _, q in layers)
        return self.alpha * sum(q.pos[0].numel() * q.bits / total * group_lasso(q) for _, _, q in layers)

    def after_step(self, model: nn.Module) -> None:
        for _, _, q in bitplane_layers(model, self._layers):
            q.clamp_planes_(0.0, 2.0)

    def schedule(self, model: nn.Module, epoch: int, epochs: int) -> bool:
        if not self.adjusts_after(epoch, epochs):
            return False
        for _, _, q in bitplane_layers(model, self._layers):
            adjust_precision(q, self.start_bits, self.threshold)
        self.resume(model, epoch, epochs)  # frozen (and, for a fixed fine-tune, float weights) from here on
        return True

    def resume(self, model: nn.Module, epoch: int, epochs: int) -> None:
        super().resume(model, epoch, epochs)
        if self._frozen and self.finetune == "fixed":
            fix_scheme(model, self._layers)

    def finalize(self, model: nn.Module) -> None:
        for _, _, q in bitplane_layers(model, self._layers):
            q.clamp_planes_(0.0, 2.0)
            q.requantize_()
