"""SAFER — Sharpness-Aware layer-selective Finetuning for Enhanced Robustness in vision transformers
(arXiv 2501.01529). Spec: ``shared/methods/safer.md`` (no public code; our concretisation of the abstract).

Adversarial fine-tuning of a ViT in which only the few layers most prone to overfitting are trained, with SAM:

* *sharpness score* of a layer: the increase of the adversarial loss when only that layer's weights move by the
  SAM step ``rho g_l / ||g_l||`` (on the calibration images, attacking the model's predictions);
* the ``layers`` highest-scoring Conv2d / Linear layers are trainable, the rest frozen;
* each step: PGD examples (as ``adv-train``), then SAM on the trainable layers (``rho``, default 0.05) on their
  cross-entropy (``bitsmith.sam``).

Deviations: the layer unit is a Linear / Conv2d module (the paper speaks of layers of a ViT; blocks are not
grouped); the score is computed once, before training.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.method import eval_mode, register_method
from bitsmith.methods.robust.adv_train import PGDSettings
from bitsmith.methods.robust.clat import SELECTION_IMAGES, parameter_layers, train_only
from bitsmith.robust.attacks import pgd
from bitsmith.sam import SharpnessStep


@register_method("safer")
@dataclass
class SAFER(PGDSettings):
    """PGD adversarial fine-tuning with SAM on the sharpest few layers only (pair it with a ``train`` section)."""

    description = "SAFER: adversarial fine-tuning with SAM on the few sharpest layers (ViTs), the rest frozen"

    eps: Annotated[float, Field(ge=0.0)] = 0.1
    rho: Annotated[float, Field(gt=0.0)] = 0.05
    layers: Annotated[int, Field(ge=1)] = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        self.spec(self.eps)
        self._selected: list[str] = []
        self._sam = SharpnessStep(self.rho)

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        images = torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in batches])[:SELECTION_IMAGES]
        scores = self.sharpness(model, images)
        self._selected = sorted(scores, key=scores.get, reverse=True)[: self.layers]
        train_only(model, self._selected)

    def sharpness(self, model: nn.Module, x: Tensor) -> dict[str, float]:
        """Per layer: adversarial loss after a SAM step of that layer alone, minus the loss before."""
        with torch.no_grad(), eval_mode(model):
            y = model(x).argmax(1)
        adv = pgd(model, x, y, self.spec(self.eps))
        out = {}
        flags = {p: p.requires_grad for p in model.parameters()}  # scored whether frozen or not
        try:
            with eval_mode(model):
                base = float(nn.functional.cross_entropy(model(adv), y))
                for name, layer in parameter_layers(model).items():
                    step = SharpnessStep(self.rho)
                    params = [p.requires_grad_(True) for p in layer.parameters()]
                    step.ascend(params, nn.functional.cross_entropy(model(adv), y))
                    with torch.no_grad():
                        out[name] = float(nn.functional.cross_entropy(model(adv), y)) - base
                    step.descend_back()
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
        return out

    def perturb(self, model: nn.Module, batch: Any) -> Any:
        x, y = batch
        self._step += 1
        return pgd(model, x, y, self.spec(self.eps)), y

    def objective(self, model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        params = [p for p in model.parameters() if p.requires_grad]
        self._sam.ascend(params, nn.functional.cross_entropy(model(x), y))
        return nn.functional.cross_entropy(model(x), y)  # at theta + eps: its gradient is SAM's

    def after_backward(self, model: nn.Module) -> bool:
        self._sam.descend_back()
        return False

    def resume(self, model: nn.Module, epoch: int, epochs: int) -> None:
        train_only(model, self._selected)

    def state_dict(self) -> dict[str, Any]:
        return {"_step": self._step, "_selected": list(self._selected)}
