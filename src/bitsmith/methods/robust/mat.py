"""MAT — Multi-strength Adversarial Training; Song, Cheng, Nie, Chen, Zhuo, Li, "MAT: A Multi-strength Adversarial
Training Method to Mitigate Adversarial Attacks", ISVLSI 2018. Spec: ``shared/methods/mat.md``.

Adversarial training at one strength eps resists attacks near eps only; MAT trains on several strengths at once.

* ``mode: mixed`` (the paper's mixed MAT): each batch becomes the clean examples plus their adversarial examples
  at every strength, ``L = [CE(x) + sum_k CE(x_adv(eps_k))] / (K + 1)`` — the spec's equal weights, divided by
  ``K + 1`` so the learning rate means the same as in plain training.
* ``mode: max`` (the max-over-strengths variant): per example, the strength whose adversarial example has the
  highest loss replaces the clean one.

Deviations: PGD (``steps`` iterations, random start) instead of the paper-era FGSM (``attack: fgsm`` gives
FGSM); parallel MAT (one model per strength, averaged) is an ensemble of ``adv-train`` models, not this method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from bitsmith.method import eval_mode, register_method
from bitsmith.methods.robust.adv_train import PGDSettings
from bitsmith.robust.attacks import pgd


@register_method("mat")
@dataclass
class MultiStrengthAdversarialTraining(PGDSettings):
    """Mixed (clean + every strength) or max-over-strengths adversarial training."""

    description = "MAT: adversarial training at several strengths at once (mixed, or max over strengths)"
    doc_page = "mat"

    strengths: list[Annotated[float, Field(ge=0.0)]] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    mode: Literal["mixed", "max"] = "mixed"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.strengths:
            raise ValueError("mat.strengths: give at least one strength, e.g. [0.05, 0.1, 0.2]")
        for eps in self.strengths:
            self.spec(eps)

    def perturb(self, model: nn.Module, batch: Any) -> Any:
        x, y = batch
        self._step += 1
        crafted = [pgd(model, x, y, self.spec(eps)) for eps in self.strengths]
        if self.mode == "mixed":
            return torch.cat([x, *crafted]), y.repeat(len(crafted) + 1)
        with torch.no_grad(), eval_mode(model):
            losses = torch.stack([nn.functional.cross_entropy(model(a), y, reduction="none") for a in crafted])
        worst = losses.argmax(0)  # (batch,) index of the strongest-loss strength per example
        return torch.stack(crafted)[worst, torch.arange(len(y))], y
