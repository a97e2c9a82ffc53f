"""DVERGE — Yang, Zhang, Cheng, Chen, Li, Chen, "DVERGE: Diversifying Vulnerabilities for Enhanced Robust Generation
of Ensembles", NeurIPS 2020. Spec: ``shared/methods/dverge.md``; official code ``zjysteven/DVERGE`` (ae2964c).

*Non-robust feature distillation*: for member ``i``, a source image ``x_s`` and a target image ``x_t``,
``x'_i = argmin_{||x' - x_s||_inf <= eps} ||h_i(x') - h_i(x_t)||^2`` where ``h_i`` is member ``i``'s feature at one
layer (a Conv2d / Linear output, before its activation): ``steps`` signed steps of size ``step_size`` with momentum
``mu = 1`` on each image's L1-normalised gradient (MI-FGSM, per sample), no random start, clipped to the ball and ``[0, 1]``. ``x'_i``
looks like ``x_s`` but carries ``x_t``'s non-robust features for member ``i``.

*Vulnerability diversification*: member ``i`` is trained on ``L_i = sum_{j != i} CE(f_i(x'_j), y_s)`` — it must
classify the other members' distilled images by their source labels, so it cannot share their non-robust
features. The ``objective`` is ``sum_i L_i`` (one optimizer: each member gets exactly its own ``L_i`` gradient, as
with the official per-member optimizers). The layer is redrawn uniformly each epoch (``layer: null``, the default)
or fixed.

Deviations: the target images are the same batch in a seeded random order (the official code draws a second
batch from another loader); distillation runs with the members in eval mode (the official code leaves them in
train mode, so batch norm also sees the distilled images); the feature layers are every Conv2d / Linear but the
last (the official code indexes ResNet blocks).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.ensemble import members_of
from bitsmith.method import Method, eval_mode, register_method


def feature_layers(member: nn.Module) -> list[nn.Module]:
    """The Conv2d / Linear layers of a member whose outputs DVERGE may distil, the classifier (last) excluded."""
    layers = [m for m in member.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return layers[:-1] or layers


def features(member: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    """``layer``'s output when ``member`` runs on ``x``."""
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        member(x)
    finally:
        handle.remove()
    return seen[0]


def distill(member: nn.Module, layer: nn.Module, source: Tensor, target: Tensor, eps: float, step_size: float,
            steps: int, mu: float = 1.0) -> Tensor:  # fmt: skip
    """Images within ``eps`` (L-inf) of ``source`` whose ``layer`` features match ``target``'s (MI-FGSM descent)."""
    with eval_mode(member), torch.no_grad():
        goal = features(member, layer, target)
    adv, momentum = source.clone(), torch.zeros_like(source)
    with eval_mode(member):
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = (features(member, layer, adv) - goal).pow(2).sum()
            (grad,) = torch.autograd.grad(loss, adv)
            norm = grad.abs().flatten(1).sum(1).clamp_min(1e-12)  # each image's own L1 norm (MI-FGSM)
            momentum = mu * momentum + grad / norm.view(-1, *[1] * (grad.dim() - 1))
            adv = adv.detach() - step_size * momentum.sign()
            adv = torch.min(torch.max(adv, source - eps), source + eps).clamp(0.0, 1.0)
    return adv.detach()


@register_method("dverge")
@dataclass
class DVERGE(Method):
    """Train an Ensemble's members on each other's distilled non-robust features."""

    description = "DVERGE: each member must classify the others' feature-distilled images (diverse vulnerabilities)"

    eps: Annotated[float, Field(gt=0.0, le=1.0)] = 0.07
    step_size: Annotated[float, Field(gt=0.0)] = 0.007
    steps: Annotated[int, Field(ge=1)] = 10
    layer: Annotated[int, Field(ge=0)] | None = None  # index into feature_layers; None: redrawn every epoch
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._layer = self.layer if self.layer is not None else 0
        self._epoch = 0

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        members = members_of(model, "dverge")
        depth = min(len(feature_layers(m)) for m in members)
        if self.layer is not None and self.layer >= depth:
            raise ValueError(f"dverge.layer: {self.layer} is out of range; the members have {depth} feature layers "
                             f"(0..{depth - 1})")  # fmt: skip
        self._draw(depth)
        return {}

    def _draw(self, depth: int) -> None:
        if self.layer is None:
            self._layer = random.Random(self.seed * 1009 + self._epoch).randrange(depth)

    def schedule(self, model: nn.Module, epoch: int, epochs: int) -> bool:
        self._epoch = epoch
        self._draw(min(len(feature_layers(m)) for m in members_of(model, "dverge")))
        return False

    def objective(self, model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        members = members_of(model, "dverge")
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed * 7919 + len(y) + self._epoch))
        target = x[order]
        distilled = [distill(m, feature_layers(m)[self._layer], x, target, self.eps, self.step_size, self.steps)
                     for m in members]  # fmt: skip
        loss = x.new_zeros(())
        for i, member in enumerate(members):
            for j, images in enumerate(distilled):
                if i != j:
                    loss = loss + nn.functional.cross_entropy(member(images), y)
        return loss
