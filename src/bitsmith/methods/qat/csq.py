"""CSQ (Xiao et al., 2022): mixed precision grown and pruned by bi-level continuous sparsification.

Spec: ``shared/methods/csq.md``. Each selected layer's weight becomes ``start_bits`` relaxed bit
positions (:class:`~bitsmith.quant.csq.CSQQuantizer`): bit values ``sigmoid(beta p)``,
``sigmoid(beta q)`` and a per-layer bit selection ``sigmoid(beta m)``, with no straight-through
estimator. The temperature grows after every epoch, ``beta_e = t_final^(e / ticket_epoch)`` (and keeps
that growth afterwards); at the ticket epoch the selection becomes hard, ``1[m > 0]``. The
budget-aware regulariser

    lam * (r - r*) * sum_l sum_b M_lb,    r* = target_bits / start_bits

prunes bits while the model is over budget (``r > r*``) and grows them back while under it. ``r`` is
the selected fraction of bit positions, weighted by layer size (``budget: size``, the paper's model
size, our default) or averaged over layers (``budget: layers``, the reference code's count).
``finalize`` hardens every bit: an exactly quantized model.

Deviations, stated: the layer scale is the value of one LSB with its gradient rescaled (as in BSQ
here); the model starts from the pretrained one (the paper trains from scratch): the bit logits start
at ``+-logit_init`` around the round-to-nearest planes of the pretrained weight, and the step is divided
by the initial relaxation gain ``sigmoid(mask_init) * tanh(logit_init / 2)``, so the relaxed weight
after ``prepare`` is the round-to-nearest weight (as the temperature rises and the selection settles,
the selected bits' weight grows by up to the inverse of that gain; the learned step absorbs it); each layer keeps at least one selected bit (an empty selection
would zero its weight); activations use a dynamic per-tensor min-max quantizer
(``a_bits``, 8 by default). ImageNet's rounds with weight rewinding are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.method import register_method
from bitsmith.methods.qat.bsq import BitLevelMethod, layers_with
from bitsmith.nn import QuantizedMixin
from bitsmith.quant.csq import CSQQuantizer
from bitsmith.quant.uniform import Bits


def csq_layers(model: nn.Module, names: list[str]) -> list[tuple[str, QuantizedMixin, CSQQuantizer]]:
    return layers_with(model, names, CSQQuantizer)


def selected_fraction(quantizers: list[CSQQuantizer], budget: str) -> float:
    """``r``: the fraction of selected bit positions, size-weighted or averaged over layers."""
    counts = [float(q.active().float().mean()) for q in quantizers]
    if budget == "layers":
        return sum(counts) / len(counts)
    sizes = [q.pos[0].numel() for q in quantizers]
    return sum(c * n for c, n in zip(counts, sizes, strict=True)) / sum(sizes)


@register_method("csq")
@dataclass
class CSQ(BitLevelMethod):
    """Relaxed bit values and bit selection, annealed to exact; a budget-signed L1 on the selection."""

    description = "CSQ: bi-level continuous sparsification of bits, temperature annealing, budget-aware growth/pruning"

    start_bits: Annotated[int, Field(ge=1, le=16)] = 6
    target_bits: Annotated[float, Field(gt=0.0)] = 3.0
    lam: Annotated[float, Field(ge=0.0)] = 1e-3
    t_final: Annotated[float, Field(ge=1.0)] = 200.0
    ticket_epoch: Annotated[int, Field(ge=1)] | None = None  # default: the last sixth of training is hard
    budget: Literal["size", "layers"] = "size"
    mask_init: float = 0.0
    logit_init: Annotated[float, Field(gt=0.0)] = 1.0
    a_bits: Bits | None = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_bits > self.start_bits:
            raise ValueError(f"csq: target_bits {self.target_bits} exceeds start_bits {self.start_bits}")

    def _weight_q(self, name: str, layer: nn.Module, overrides: dict[str, Any]) -> CSQQuantizer:
        cfg = self.layer_config(overrides)
        layer.weight.requires_grad_(False)  # the bit logits are the weight now
        q = CSQQuantizer(cfg["start_bits"], cfg["mask_init"], cfg["logit_init"])
        return q.calibrate_(layer.masked_weight())  # type: ignore[return-value]

    def _quantizers(self, model: nn.Module) -> list[CSQQuantizer]:
        return [q for _, _, q in csq_layers(model, self._layers)]

    def penalty(self, model: nn.Module, batch: Any) -> Tensor:
        quantizers = self._quantizers(model)
        if self.lam == 0 or not quantizers or bool(quantizers[0].hard_mask):
            return torch.zeros(())
        over = selected_fraction(quantizers, self.budget) - self.target_bits / self.start_bits
        return self.lam * over * sum(q.selection().sum() for q in quantizers)

    def schedule(self, model: nn.Module, epoch: int, epochs: int) -> bool:
        ticket = self.ticket_epoch or max(1, epochs - max(1, epochs // 6))
        for q in self._quantizers(model):
            q.beta.fill_(self.t_final ** (epoch / ticket))
            if epoch >= ticket:
                q.hard_mask.fill_(True)
        return False

    def finalize(self, model: nn.Module) -> None:
        for q in self._quantizers(model):
            q.harden_()

    def precision(self, model: nn.Module) -> dict[str, int]:
        """Selected bit positions per layer now."""
        return {name: q.active_bits for name, _, q in csq_layers(model, self._layers)}

    def average_bits(self, model: nn.Module) -> float:
        """``start_bits * r`` (size-weighted): the paper's final average bits."""
        return self.start_bits * selected_fraction(self._quantizers(model), "size")
