"""PGD adversarial training — Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018. The baseline of the robustness line (MAT, DVERGE, CLAT, SAFER build on it).

Every training batch is replaced by its PGD examples (L-inf or L2, random start, ``steps`` iterations of size
``step_size``, default 2.5 eps / steps) crafted on the current model, and the task loss is taken on those alone.
Deviations: the examples are crafted with the model in eval mode (batch norm uses its running statistics, so
crafting does not move them), as most public implementations do; each step draws a fresh random start from a
seeded counter (saved with a resumable run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field
from torch import nn

from bitsmith.method import Method, register_method
from bitsmith.robust.attacks import AttackSpec, attack_spec, pgd


@dataclass
class PGDSettings(Method):
    """The crafting settings shared by the adversarial-training methods (not registered itself)."""

    steps: Annotated[int, Field(ge=1)] = 7
    step_size: Annotated[float, Field(gt=0.0)] | None = None
    norm: Literal["inf", "2"] = "inf"
    attack: Literal["pgd", "fgsm"] = "pgd"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._step = 0

    def spec(self, eps: float) -> AttackSpec:
        """The attack at strength ``eps`` for the current step (a fresh seeded random start each step)."""
        return attack_spec(self.registered_name, name=self.attack, eps=eps, norm=self.norm, steps=self.steps,
                           step_size=self.step_size, seed=self.seed * 1_000_003 + self._step)  # fmt: skip


@register_method("adv-train")
@dataclass
class AdversarialTraining(PGDSettings):
    """Madry PGD adversarial training: pair it with a ``train`` section."""

    description = "PGD adversarial training (Madry et al.): train on PGD examples crafted each step"
    doc_page = "mat"

    eps: Annotated[float, Field(ge=0.0)] = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.spec(self.eps)  # bad settings fail here, naming the field

    def perturb(self, model: nn.Module, batch: Any) -> Any:
        x, y = batch
        self._step += 1
        return pgd(model, x, y, self.spec(self.eps)), y
