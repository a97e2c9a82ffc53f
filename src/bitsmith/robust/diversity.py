"""How differently the members of an ensemble fail: the pairwise transferability matrix (adversarial examples of
member i evaluated on member j, DVERGE's measure) and prediction disagreement."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bitsmith.robust.attacks import AttackSpec, pgd
from bitsmith.train import predict


def transferability(members: Sequence[nn.Module], x: Tensor, y: Tensor, spec: AttackSpec) -> Tensor:
    """``(M, M)`` transfer success rates: entry ``(i, j)`` is the share of the images both members classify
    correctly whose PGD example crafted on member ``i`` fools member ``j`` (the diagonal: white-box success)."""
    correct = torch.stack([predict(m, x) == y for m in members])  # (M, N)
    out = torch.zeros(len(members), len(members))
    for i, source in enumerate(members):
        adv = pgd(source, x, y, spec)
        for j, target in enumerate(members):
            both = correct[i] & correct[j]
            fooled = predict(target, adv[both]) != y[both]
            out[i, j] = fooled.float().mean() if both.any() else float("nan")
    return out


def disagreement(members: Sequence[nn.Module], x: Tensor) -> float:
    """Mean over member pairs of the share of images on which their top-1 predictions differ."""
    predictions = [predict(m, x) for m in members]
    pairs = [(i, j) for i in range(len(members)) for j in range(i + 1, len(members))]
    return sum(float((predictions[i] != predictions[j]).float().mean()) for i, j in pairs) / max(len(pairs), 1)
