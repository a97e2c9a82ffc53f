"""HCE — Heterogeneously Compressed Ensemble; "HCE: Improving Performance and Efficiency with Heterogeneously
Compressed Neural Network Ensemble" (2023). Spec: ``shared/methods/hce.md`` (no public code; the objective is the
spec's reading of the abstract, marked "verify").

Pruning and quantization of one pretrained model change its decision boundary in different ways, so a pruned
member and a quantized member err less alike than two members of one kind. The members of an
:class:`bitsmith.ensemble.Ensemble` are compressed by the recipe's other methods (e.g. ``prune`` on
``members.0.*``, ``qat`` on ``members.1.*``), and ``hce`` trains them jointly with

``L = mean_i CE(f_i(x), y) + lam * CE(f_ens(x), y) - mu * D``,

``D`` the mean pairwise Jensen-Shannon divergence between the members' predictive distributions over the
*non-target* classes (ADP-style: diversity is rewarded only where it costs no true-class confidence).

Deviations: the exact diversity term of the paper is not public; ``D`` follows the spec's ADP-style reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.ensemble import combine, members_of
from bitsmith.method import Method, register_method


def non_target_distributions(logits: Tensor, y: Tensor) -> Tensor:
    """``(members, batch, classes - 1)`` softmax over every class but the true one."""
    keep = torch.ones_like(logits[0], dtype=torch.bool).scatter_(1, y[:, None], False)  # (batch, classes)
    others = logits[:, keep].view(logits.shape[0], logits.shape[1], -1)
    return torch.softmax(others, dim=-1)


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Per-row Jensen-Shannon divergence (natural log) of two distributions ``(batch, k)``."""
    m = (p + q) / 2
    kl = lambda a: (a * (a.clamp_min(1e-12).log() - m.clamp_min(1e-12).log())).sum(-1)  # noqa: E731
    return (kl(p) + kl(q)) / 2


def non_target_diversity(logits: Tensor, y: Tensor) -> Tensor:
    """``D``: mean over member pairs and examples of the JS divergence of their non-target distributions."""
    dists = non_target_distributions(logits, y)
    pairs = [(i, j) for i in range(len(dists)) for j in range(i + 1, len(dists))]
    return sum(js_divergence(dists[i], dists[j]).mean() for i, j in pairs) / len(pairs)


@register_method("hce")
@dataclass
class HCE(Method):
    """Joint training of heterogeneously compressed members with a non-target diversity reward."""

    description = "HCE: pruned + quantized members of one model trained jointly with a non-target diversity reward"

    lam: Annotated[float, Field(ge=0.0)] = 1.0
    mu: Annotated[float, Field(ge=0.0)] = 0.5

    def objective(self, model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        members_of(model, "hce")
        logits = model.member_logits(x)  # (members, batch, classes)
        own = sum(nn.functional.cross_entropy(member, y) for member in logits) / len(logits)
        ensemble = nn.functional.nll_loss(combine(logits), y)
        return own + self.lam * ensemble - self.mu * non_target_diversity(logits, y)
