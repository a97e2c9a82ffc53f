"""MSQ (ICCV 2025): memory-efficient bit sparsification by round-clamp LSB extraction.

Spec: ``shared/methods/msq.md`` (a reconstruction from the abstract; its formulas are marked
"verify"). Unlike BSQ, the float weight stays the only per-weight trainable tensor: the
``RoundClampQuantizer`` quantizes it to ``n``-bit sign-magnitude codes with a straight-through
gradient and exposes the codes' least significant bit to autograd (``|k - 2 round(k/2)|``, gradient
through ``k``). Training adds

    alpha * sum_l ||step_l * LSB_l||_1

which pushes each code to the nearest even value. The LSB is taken in weight units (``step_l``
times the bit), so every weight, in every layer, feels the same pull ``alpha`` toward its even
neighbour; on the bare bit the pull would be ``1 / step_l`` times larger and move weights by several
codes per SGD step (measured: fine-grid layers then oscillate between odd codes and never empty their
LSB). Every ``adjust_every`` epochs, and every ``adjust_steps`` optimizer steps within the regularised
epochs, unused most significant bits are dropped, and a layer whose LSB density (fraction of odd
codes) is at most ``threshold`` drops its LSB (the step doubles; lossless when the density is 0).
Hessian-aware multi-LSB pruning: the ``hessian_fraction`` of layers with the smallest Hutchinson
trace per weight (measured on ``hessian_batch`` samples of the last training batch) drop
``max_drop`` LSBs at once, re-rounding to the coarser grid. The last ``finetune_epochs`` epochs train
at the found precision without the regulariser.

Deviations, stated: the LSB extraction, the penalty's normalisation and the multi-LSB rule are our
reconstruction; the density threshold (default 0.05, BSQ uses exact zero planes) lets a float-weight
layer drop an LSB that the L1 term has nearly emptied, at the cost of re-rounding those few codes;
step-wise adjustments (``adjust_steps``) fit the paper's epoch-wise schedule into short budgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith import distributed
from bitsmith.method import eval_mode, register_method
from bitsmith.methods.qat.bsq import PrecisionSearch, layers_with
from bitsmith.nn import QuantizedMixin
from bitsmith.quant.roundclamp import RoundClampQuantizer
from bitsmith.sensitivity import hutchinson_traces


def roundclamp_layers(model: nn.Module, names: list[str]) -> list[tuple[str, QuantizedMixin, RoundClampQuantizer]]:
    """The named layers with a round-clamp weight quantizer."""
    return layers_with(model, names, RoundClampQuantizer)


@register_method("msq")
@dataclass
class MSQ(PrecisionSearch):
    """Float weights, an L1 on their quantized codes' LSBs, Hessian-aware multi-LSB pruning."""

    description = "MSQ: round-clamp LSB extraction, LSB L1, Hessian-aware multi-LSB pruning (mixed precision)"

    alpha: Annotated[float, Field(ge=0.0)] = 0.01
    threshold: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    hessian_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    max_drop: Annotated[int, Field(ge=1, le=8)] = 2
    min_bits: Annotated[int, Field(ge=1, le=16)] = 2
    probes: Annotated[int, Field(ge=4)] = 16
    hessian_batch: Annotated[int, Field(ge=1)] = 32
    adjust_steps: Annotated[int, Field(ge=0)] = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._steps_in_epoch = 0

    def _weight_q(self, name: str, layer: nn.Module, overrides: dict[str, Any]) -> RoundClampQuantizer:
        bits = self.layer_config(overrides)["start_bits"]
        return RoundClampQuantizer(bits).calibrate_(layer.masked_weight())  # type: ignore[return-value]

    def penalty(self, model: nn.Module, batch: Any) -> Tensor:
        self._last_batch = batch
        layers = roundclamp_layers(model, self._layers)
        if self._frozen or self.alpha == 0 or not layers:
            return torch.zeros(())
        return self.alpha * sum((q.lsb(layer.masked_weight()) * q.step).sum() for _, layer, q in layers)

    def after_backward(self, model: nn.Module) -> bool:
        """Every ``adjust_steps`` steps of a regularised epoch (0: never), adjust the precision."""
        self._steps_in_epoch += 1
        if self.adjust_steps and not self._frozen and self._steps_in_epoch % self.adjust_steps == 0:
            self._adjust_layers(model)
        return False

    def schedule(self, model: nn.Module, epoch: int, epochs: int) -> bool:
        self._steps_in_epoch = 0  # step-wise adjustments count within an epoch: a resumed run repeats them
        if not self.adjusts_after(epoch, epochs):
            return False
        self._adjust_layers(model)
        self.resume(model, epoch, epochs)  # frozen from the fine-tune on
        return False  # the float weights and steps are the same parameters: the optimizer keeps them

    def _adjust_layers(self, model: nn.Module) -> None:
        layers = roundclamp_layers(model, self._layers)
        insensitive = self._least_sensitive(model, [name for name, _, _ in layers])
        for name, layer, q in layers:
            self._adjust(q, layer.masked_weight().detach(), self.max_drop if name in insensitive else 1)

    def _least_sensitive(self, model: nn.Module, names: list[str]) -> set[str]:
        """The ``hessian_fraction`` of layers with the smallest Hessian trace per weight."""
        count = int(self.hessian_fraction * len(names))
        batch = getattr(self, "_last_batch", None)
        if count == 0 or batch is None or self.max_drop == 1:
            return set()
        inputs, labels = batch[0][: self.hessian_batch], batch[1][: self.hessian_batch]
        with eval_mode(model):
            traces = hutchinson_traces(
                model, lambda m: nn.functional.cross_entropy(m(inputs), labels), names, self.probes, seed=0
            )
        (averaged,) = distributed.average([torch.tensor([traces[n] for n in names])])  # data-parallel: all ranks agree
        traces = dict(zip(names, averaged.tolist(), strict=True))
        return set(sorted(names, key=lambda n: traces[n])[:count])

    def _adjust(self, q: RoundClampQuantizer, weight: Tensor, allowed: int) -> None:
        codes = q.integers(weight).abs()
        while q.bits > self.min_bits and bool((codes < 2 ** (q.bits - 1)).all()):
            q.drop_msb_()
        if q.bits <= self.min_bits or float((codes % 2).mean()) > self.threshold:
            return
        for _ in range(min(allowed, q.bits - self.min_bits)):
            q.drop_lsb_()

    def finalize(self, model: nn.Module) -> None:
        """Nothing to harden: the forward pass is already the exact quantized weight."""

    def trainable_parameters(self, model: nn.Module) -> int:
        """Trainable values of the quantized layers' weights (the float weights; steps are fixed)."""
        return sum(layer.weight.numel() for _, layer, _ in roundclamp_layers(model, self._layers))
