"""Pruning baselines: magnitude (one global threshold or per layer) and N:M masks, one-shot or gradual.

A selected layer becomes a ``QLinear`` / ``QConv2d`` with a boolean mask (no quantizers unless another
method adds them); the mask is saved at one bit per weight. ``gradual`` raises the sparsity after each
epoch along Zhu & Gupta's cubic schedule ``s_e = s (1 - (1 - e / E_p)^3)`` over the first ``ramp`` of
the epochs (``E_p``), scoring the already-masked weights so pruned weights stay pruned; the remaining
epochs fine-tune at the final sparsity (iterative prune-finetune).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field
from torch import nn

from bitsmith.method import Method, register_method
from bitsmith.methods.sparse.sparsity import magnitude_masks, nm_mask
from bitsmith.quant.layers import attach


@register_method("prune")
@dataclass
class Prune(Method):
    """Zero the smallest weights (magnitude) or keep N of every M inputs, with masks."""

    description = "magnitude (global / per-layer) and N:M pruning, one-shot or gradual with fine-tuning"

    kind: Literal["magnitude", "nm"] = "magnitude"
    sparsity: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    scope: Literal["global", "layer"] = "global"
    n: Annotated[int, Field(ge=1)] = 2
    m: Annotated[int, Field(ge=2)] = 4
    gradual: bool = False
    ramp: Annotated[float, Field(gt=0.0, le=1.0)] = 0.75

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        specs = attach(model, self.where, None, None)
        self._layers = list(specs)
        if not self.gradual:
            self.apply(model, self.sparsity)
        return specs

    def apply(self, model: nn.Module, sparsity: float) -> None:
        """Set every selected layer's mask for ``sparsity`` (magnitude) or the N:M pattern."""
        layers = {name: model.get_submodule(name) for name in self._layers}
        if self.kind == "nm":
            masks = {name: nm_mask(layer.masked_weight(), self.n, self.m) for name, layer in layers.items()}
        else:
            weights = {name: layer.masked_weight().detach() for name, layer in layers.items()}
            masks = magnitude_masks(weights, sparsity, self.scope)
        for name, layer in layers.items():
            layer.set_mask(masks[name])

    def schedule(self, model: nn.Module, epoch: int, epochs: int) -> bool:
        if not self.gradual:
            return False
        ramp_epochs = max(1, round(self.ramp * epochs))
        if epoch <= ramp_epochs:
            self.apply(model, self.sparsity * (1 - (1 - epoch / ramp_epochs) ** 3))
        return False

    def finalize(self, model: nn.Module) -> None:
        """A gradual run that never trained ends at its final sparsity."""
        if self.gradual and any(model.get_submodule(n).mask is None for n in self._layers):
            self.apply(model, self.sparsity)
