"""Split-Ensemble — Chen, Yang, Gan et al., "Split-Ensemble: Efficient OOD-aware Ensemble via Task and Model
Splitting", ICML 2024. Spec: ``shared/methods/split-ensemble.md`` (no public code).

Trains a :class:`bitsmith.split_ensemble.SplitEnsemble`: branch ``m`` learns its class group ``K_m`` plus one
out-of-distribution class that collects every sample of the other groups, so each subtask's "other" data is its OOD
training data (OOD-aware training without external OOD data). The loss is the mean over branches of a class-weighted
cross-entropy; the OOD class is weighted ``ood_weight`` (default: its inverse frequency, ``1 / (C - |K_m|)``, so it
counts as much as one class).

Deviations: the split point is fixed by the model's builder (``zoo.vision.split_cnn`` shares the stem and first
stage) and the branch widths are set to the single model's MACs; the paper chooses the split layer by a
correlation / sensitivity criterion and prunes globally to that budget. The class-imbalance weighting is not
specified in the abstract; inverse frequency is ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.method import Method, register_method
from bitsmith.split_ensemble import SplitEnsemble


@register_method("split-ensemble")
@dataclass
class SplitEnsembleTraining(Method):
    """Each branch trained on its class group plus an OOD class made of the other groups' samples."""

    description = "Split-Ensemble: class-group subtasks with an OOD class each, shared trunk, one branch per subtask"
    doc_page = "split-ensemble"

    ood_weight: Annotated[float, Field(gt=0.0)] | None = None  # None: inverse frequency, 1 / (C - |K_m|)

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        if not isinstance(model, SplitEnsemble):
            raise ValueError("split-ensemble trains a SplitEnsemble: build it with bitsmith.zoo.vision.split_cnn(groups)"
                             " (or model: {name: cnn, split: 3} in a recipe)")  # fmt: skip
        return {}

    def class_weights(self, model: SplitEnsemble, branch: int, device: torch.device) -> Tensor:
        size = len(model.groups[branch])
        weights = torch.ones(size + 1, device=device)
        weights[-1] = self.ood_weight if self.ood_weight is not None else 1.0 / (model.classes - size)
        return weights

    def objective(self, model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        self.prepare(model)
        loss = x.new_zeros(())
        for m, logits in enumerate(model.branch_logits(x)):
            targets = model.local_targets(y, m)
            loss = loss + nn.functional.cross_entropy(logits, targets, weight=self.class_weights(model, m, x.device))
        return loss / len(model.branches)
