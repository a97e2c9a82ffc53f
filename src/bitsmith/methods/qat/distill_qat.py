"""Distillation-stabilised QAT after QD-BEV (Zhang, Dong, H. Yang et al., "QD-BEV: Quantization-aware View-guided
Distillation for Multi-view 3D Object Detection", ICCV 2023), adapted to classification.

QD-BEV observes that quantization-aware training of a BEV detector is unstable and loses accuracy, and adds a
view-guided distillation objective from the full-precision model: the student's image-view features and its BEV
features are pulled towards the teacher's, besides the task loss. Here the two views become the features a
classifier has: ``features`` (intermediate feature maps, the "image features"; default the middle of the network)
and ``representation`` (what the classifier head reads, the "BEV features"), plus the logits. The loss added to the
task loss during training:

    feature_weight * sum_f ||s_f - t_f||^2 / ||t_f||^2  +  representation_weight * ||s_r - t_r||^2 / ||t_r||^2
        +  logit_weight * T^2 KL(softmax(t / T) || softmax(s / T))

with the teacher a frozen copy of the model taken in ``prepare`` — so ``distill-qat`` is listed **before** the
quantization method (``qat``, ``bsq``, ...) in a recipe, and refuses a model that is already quantized. With
``feature_weight`` and ``representation_weight`` 0 it is plain logit distillation (the baseline).

Deviations, stated: the paper's detector views (image backbone / FPN features and BEV grid features, with its own
per-view loss weighting) are not available in a classifier; the relative MSE (scale-free) replaces its feature loss
normalisation; the default sites are the zoo models' (ViT: the middle block's output and the final norm's output,
every token; CNN: ``layer2`` and the pooled features) and ``features`` / ``representation`` name others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.distill import OutputRecorder, frozen_copy, relative_mse, soft_kl, teacher_outputs
from bitsmith.method import Method, output_logits, register_method
from bitsmith.nn import is_compressed


def default_sites(model: nn.Module) -> tuple[list[str], str]:
    """The zoo models' intermediate feature sites and the representation the head reads."""
    names = dict(model.named_modules())
    if "blocks" in names and "norm" in names and "head" in names:  # zoo ViT
        return [f"blocks.{len(model.blocks) // 2 - 1}"], "norm"
    if "layer2" in names and "pool" in names and "fc" in names:  # zoo CNN
        return ["layer2"], "pool"
    raise ValueError(f"distill-qat: no default feature sites for {type(model).__name__}; name them with "
                     "`features: [module names]` and `representation: module name`")  # fmt: skip


@register_method("distill-qat")
@dataclass
class DistillQAT(Method):
    """QAT stabilised by distillation from the FP32 model: features, representation and logits."""

    description = "QD-BEV-style distillation for QAT: features, representation and logits of the FP32 teacher"

    features: list[str] = field(default_factory=list)
    representation: str = ""
    feature_weight: Annotated[float, Field(ge=0.0)] = 1.0
    representation_weight: Annotated[float, Field(ge=0.0)] = 1.0
    logit_weight: Annotated[float, Field(ge=0.0)] = 1.0
    temperature: Annotated[float, Field(gt=0.0)] = 4.0

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        quantized = [name for name, m in model.named_modules() if is_compressed(m)]
        if quantized:
            raise ValueError(f"distill-qat: the model already holds quantized layers ({quantized[0]}, ...): list "
                             "distill-qat before the quantization method, so that its teacher is the FP32 model")  # fmt: skip
        features, representation = (self.features, self.representation) if self.features or self.representation \
            else default_sites(model)  # fmt: skip
        names = dict(model.named_modules())
        unknown = [n for n in [*features, representation] if n and n not in names]
        if unknown:
            raise ValueError(f"distill-qat: {unknown} are not modules of the model (e.g. {list(names)[1:6]})")
        self._features, self._representation = list(features), representation
        self._teacher = frozen_copy(model)
        sites = [*self._features, *([representation] if representation else []), ""]  # "": the logits
        self._student = OutputRecorder(model, sites)
        return {}

    def penalty(self, model: nn.Module, batch: Any) -> Tensor:
        student = self._student.take()
        if not student:  # no training forward recorded (e.g. called outside a training step)
            return torch.zeros(())
        teacher, _ = teacher_outputs(self._teacher, list(student), batch)
        loss = torch.zeros(())
        if self.feature_weight:
            loss = loss + self.feature_weight * sum(relative_mse(student[n], teacher[n]) for n in self._features)
        if self.representation_weight and self._representation:
            name = self._representation
            loss = loss + self.representation_weight * relative_mse(student[name], teacher[name])
        if self.logit_weight:
            student_logits, teacher_logits = output_logits(student[""]), output_logits(teacher[""])
            loss = loss + self.logit_weight * soft_kl(student_logits, teacher_logits, self.temperature)
        return loss

    def finalize(self, model: nn.Module) -> None:
        self._student.remove()

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k not in ("_teacher", "_student")}
