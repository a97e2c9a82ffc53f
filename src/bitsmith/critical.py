"""Critical-category objectives (Fisher-aware quantization, ``shared/methods/fisher-aware.md``).

The non-critical classes are merged into one "other" class whose logit is the log-sum-exp of theirs,
so the loss ``L_A`` measures the model only on the critical classes ``K``: a critical example must be
told apart from every other class, a non-critical one only from the critical classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _critical_index(classes: Sequence[int], num_classes: int) -> Tensor:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"critical classes {list(classes)} must be a non-empty subset of 0..{num_classes - 1}")
    return torch.as_tensor(list(classes), dtype=torch.long)


def merge_noncritical(logits: Tensor, classes: Sequence[int]) -> Tensor:
    """``(N, |K| + 1)`` logits: the critical classes' own, then log-sum-exp of all the others."""
    index = _critical_index(classes, logits.shape[-1]).to(logits.device)
    rest = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
    rest[index] = False
    other = logits[:, rest].logsumexp(-1, keepdim=True) if bool(rest.any()) else logits[:, :0]
    return torch.cat([logits[:, index], other], dim=-1)


def critical_targets(labels: Tensor, classes: Sequence[int], num_classes: int) -> Tensor:
    """Labels in the merged space: the position in ``classes``, or ``len(classes)`` for any other class."""
    lookup = torch.full((num_classes,), len(classes), dtype=torch.long, device=labels.device)
    lookup[_critical_index(classes, num_classes).to(labels.device)] = torch.arange(len(classes), device=labels.device)
    return lookup[labels]


def critical_loss(logits: Tensor, labels: Tensor, classes: Sequence[int], reduction: str = "mean") -> Tensor:
    """``L_A``: cross-entropy on the merged (critical + other) logits."""
    merged = merge_noncritical(logits, classes)
    return nn.functional.cross_entropy(merged, critical_targets(labels, classes, logits.shape[-1]), reduction=reduction)


def critical_mask(labels: Tensor, classes: Sequence[int]) -> Tensor:
    """Which examples belong to a critical class."""
    return torch.isin(labels, torch.as_tensor(list(classes), device=labels.device))
