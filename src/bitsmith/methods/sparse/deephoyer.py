"""DeepHoyer (Yang, Wen & Li, ICLR 2020): scale-invariant sparsity regularisers, then prune and fine-tune.

Spec: ``shared/methods/deephoyer.md`` (code: yanghr/DeepHoyer). Training adds ``lam * sum_l R(W_l)``
with ``R`` one of ``bitsmith.methods.sparse.sparsity.REGULARIZERS``: ``hoyer-square`` (element-wise, the paper's) or
``group-hoyer-square`` (input and output channels), and the baselines ``l1``, ``hoyer``,
``transformed-l1``, ``group-lasso``. After ``epochs - finetune_epochs`` epochs (the ``schedule`` hook),
or at ``finalize`` without training, the weights are pruned to exact zeros: element-wise
``|w| <= sensitivity * std(W_l)`` (``prun_tune_V``), structural: channels whose group norm is at most
``sensitivity`` times the layer's mean group norm. The remaining epochs fine-tune with the masks
fixed and the regulariser off.

Deviation, stated: the structural threshold is relative to the layer's mean group norm (the code
uses fixed absolute thresholds per experiment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.method import Method, register_method
from bitsmith.methods.sparse.sparsity import REGULARIZERS, STRUCTURED, group_norms, group_threshold_mask, threshold_mask
from bitsmith.quant.layers import attach

Regularizer = Literal["hoyer-square", "group-hoyer-square", "l1", "hoyer", "transformed-l1", "group-lasso"]


@register_method("deephoyer")
@dataclass
class DeepHoyer(Method):
    """A sparsity regulariser during training, then pruning to exact zeros and masked fine-tuning."""

    description = "DeepHoyer: Hoyer-square / group Hoyer-square regularisers (and L1, group Lasso), prune, fine-tune"

    regularizer: Regularizer = "hoyer-square"
    lam: Annotated[float, Field(ge=0.0)] = 1e-3
    sensitivity: Annotated[float, Field(ge=0.0)] = 0.25
    finetune_epochs: Annotated[int, Field(ge=0)] = 1

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        specs = attach(model, self.where, None, None)
        self._layers = list(specs)
        return specs

    def _pruned(self, model: nn.Module) -> bool:
        return all(model.get_submodule(n).mask is not None for n in self._layers)

    def penalty(self, model: nn.Module, batch: Any) -> Tensor:
        if self.lam == 0 or self._pruned(model):
            return torch.zeros(())
        regularizer = REGULARIZERS[self.regularizer]
        return self.lam * sum(regularizer(model.get_submodule(n).masked_weight()) for n in self._layers)

    def schedule(self, model: nn.Module, epoch: int, epochs: int) -> bool:
        if epoch == max(1, epochs - self.finetune_epochs) and not self._pruned(model):
            self.prune(model)
        return False

    def finalize(self, model: nn.Module) -> None:
        if not self._pruned(model):
            self.prune(model)

    @torch.no_grad()
    def prune(self, model: nn.Module) -> None:
        """Exact zeros: element-wise std threshold, or whole channels for the group regularisers."""
        for name in self._layers:
            layer = model.get_submodule(name)
            w = layer.masked_weight()
            if self.regularizer in STRUCTURED:
                inputs, outputs = group_norms(w)
                mean = torch.cat([inputs, outputs]).mean()
                layer.set_mask(group_threshold_mask(w, float(self.sensitivity * mean)))
            else:
                layer.set_mask(threshold_mask(w, self.sensitivity))
