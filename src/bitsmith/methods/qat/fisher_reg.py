"""Fisher-trace regulariser for critical classes (Fisher-aware quantization, ``shared/methods/fisher-aware.md``).

During (quantization-aware) training, ``penalty`` adds ``lam * tr(F_A)`` with the per-batch estimate
``tr(F_A) ~ ||grad_W L_A||^2``: the squared norm of the gradient of the critical-class loss ``L_A``
(non-critical classes merged into one, ``bitsmith.critical``) over the selected layers' weights,
differentiated again by double backward. It flattens the critical classes' loss landscape so that the
quantization noise costs them less. List it after ``qat`` so that the gradient passes through the
fake quantizers. Cost: one more forward and a double backward per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.critical import critical_loss
from bitsmith.method import Method, register_method
from bitsmith.sensitivity import double_backward_attention


def critical_gradient_norm(model: nn.Module, weights: list[Tensor], batch: Any, classes: list[int]) -> Tensor:
    """``||grad_W L_A||^2`` on one ``(inputs, labels)`` batch, differentiable (``create_graph``)."""
    inputs, labels = batch
    with double_backward_attention():
        loss = critical_loss(model(inputs), labels, classes)
        grads = torch.autograd.grad(loss, weights, create_graph=True)
    return sum((g.pow(2).sum() for g in grads), torch.zeros(()))


@register_method("fisher-reg")
@dataclass
class FisherTraceRegularizer(Method):
    """``lam * ||grad_W L_A||^2`` added to the training loss, ``L_A`` the critical-class loss."""

    description = "Fisher-trace regulariser on critical classes for quantization-aware finetuning"
    doc_page = "fisher-aware"

    critical: list[Annotated[int, Field(ge=0)]] = field(default_factory=lambda: [0])
    lam: Annotated[float, Field(ge=0.0)] = 0.1

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        self._layers = list(self.where.resolve(model))
        return {}

    def penalty(self, model: nn.Module, batch: Any) -> Tensor:
        if self.lam == 0:
            return torch.zeros(())
        layers = getattr(self, "_layers", None) or list(self.where.resolve(model))
        weights = [model.get_submodule(name).weight for name in layers]
        return self.lam * critical_gradient_norm(model, weights, batch, self.critical)
