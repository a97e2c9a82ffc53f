"""HERO: Hessian-enhanced robust optimization (arXiv 2111.11986), with SAM as its ablation.

Spec: ``shared/methods/hero.md`` (the objective is the spec's reconstruction, marked "verify"):
``L_HERO(W) = L(W) + gamma * ||grad L(W)||``, whose gradient ``g + gamma * H g/||g||`` is taken by a
finite difference, ``H g_hat ~ (grad L(W + h g_hat) - g) / h``: one extra forward/backward per step at
the point moved by ``h`` along the normalised gradient. Small Hessian eigenvalues bound the loss
increase under any small weight perturbation, quantization error included, so a HERO-trained model
loses less under post-training quantization.

Both are ``penalty`` hooks: the returned scalar's value is ``gamma * ||g||`` and its gradient is the
finite-difference term, so any loop that adds penalties to the loss (``bitsmith.train.fit`` or your
own) trains with them. ``sam`` (Foret et al.) is the special case ``gamma = h = rho``: the update uses
the gradient at the perturbed point only. Buffers (batch-norm running statistics) are restored after
the extra passes, so they see each batch once. Cost: two extra forward/backward passes per step
(``g`` is recomputed because the hook does not see the loop's own gradient).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.method import Method, register_method


@contextlib.contextmanager
def restored_buffers(model: nn.Module) -> Iterator[None]:
    """Forward passes inside the block update copies of the buffers (batch-norm statistics); the original
    tensors come back untouched afterwards, so a graph that saved them (the loop's own loss) stays valid."""
    saved = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()]
    for module, name, buffer in saved:
        if buffer is not None:
            module._buffers[name] = buffer.clone()
    try:
        yield
    finally:
        for module, name, buffer in saved:
            module._buffers[name] = buffer


def finite_difference_penalty(model: nn.Module, batch: Any, gamma: float, radius: float) -> Tensor:
    """A scalar with value ``gamma * ||g||`` and gradient ``gamma * (grad L(W + radius g_hat) - g) / radius``.

    The moved weights are passed with ``torch.func.functional_call``: the parameters are never written,
    so the loop's own loss graph stays valid."""
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    inputs, labels = batch

    def gradient(weights: dict[str, Tensor]) -> tuple[Tensor, ...]:
        logits = torch.func.functional_call(model, weights, (inputs,))
        return torch.autograd.grad(nn.functional.cross_entropy(logits, labels), params)

    with restored_buffers(model):
        g = gradient(named)
        norm = torch.sqrt(sum((gi.pow(2).sum() for gi in g), torch.zeros((), dtype=g[0].dtype)))
        scale = radius / norm.clamp(min=1e-12)
        moved = gradient({name: p + scale * gi for (name, p), gi in zip(named.items(), g, strict=True)})
    surrogate = (gamma / radius) * sum(
        ((p * (m - gi)).sum() for p, m, gi in zip(params, moved, g, strict=True)), torch.zeros((), dtype=norm.dtype)
    )
    return surrogate - surrogate.detach() + gamma * norm


@register_method("hero")
@dataclass
class HERO(Method):
    """Train against the Hessian: ``+ gamma * ||grad L||`` by a finite-difference Hessian-vector product."""

    description = "Hessian-enhanced robust optimization: gradient-norm penalty by finite-difference H.g"

    gamma: Annotated[float, Field(ge=0.0)] = 0.1
    radius: Annotated[float, Field(gt=0.0)] = 0.05

    def penalty(self, model: nn.Module, batch: Any) -> Tensor:
        if self.gamma == 0:
            return torch.zeros(())
        return finite_difference_penalty(model, batch, self.gamma, self.radius)


@register_method("sam")
@dataclass
class SAM(Method):
    """Sharpness-aware minimisation: the gradient at ``W + rho g_hat`` (HERO's ablation baseline)."""

    description = "sharpness-aware minimisation (SAM), the baseline HERO is compared with"
    doc_page = "hero"

    rho: Annotated[float, Field(gt=0.0)] = 0.05

    def penalty(self, model: nn.Module, batch: Any) -> Tensor:
        return finite_difference_penalty(model, batch, self.rho, self.rho)
