"""Deep ensemble — Lakshminarayanan, Pritzel, Blundell, "Simple and Scalable Predictive Uncertainty Estimation using
Deep Ensembles", NeurIPS 2017: the baseline of every ensemble method here. Each member of an
:class:`bitsmith.ensemble.Ensemble` is trained on its own cross-entropy, as if alone (one optimizer over all
members gives each member exactly its own gradient); members differ by their initialisation. The loss is the sum
over members, so each member's gradient is the one it would get alone and a learning rate means what it means
for one model (a mean would hand each member 1/M of it: lr / M under SGD). No adversarial training for the
members.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from bitsmith.ensemble import members_of
from bitsmith.method import Method, register_method


@register_method("ensemble")
@dataclass
class DeepEnsemble(Method):
    """Every member trained on its own cross-entropy."""

    description = "deep ensemble: each member of an Ensemble trained on its own cross-entropy (the baseline)"
    doc_page = "dverge"

    def objective(self, model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        members = members_of(model, "ensemble")
        return sum(nn.functional.cross_entropy(member(x), y) for member in members)
