"""Out-of-distribution detection: a model's in-distribution score (its ``ood_score`` when it has one, e.g. a
Split-Ensemble; else the maximum softmax probability, MSP), AUROC of in- vs out-of-distribution scores, and the
locally made OOD sets (a stated corruption of the test images)."""

from __future__ import annotations

import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from bitsmith.method import eval_mode


@torch.no_grad()
def in_distribution_score(model: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """Higher = more in-distribution: ``model.ood_score`` if defined, else the maximum softmax probability."""
    scores = []
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]
            own = getattr(model, "ood_score", None)
            scores.append(own(x) if own is not None else torch.softmax(model(x), dim=-1).max(dim=1).values)
    return torch.cat(scores)


def auroc(inside: Tensor, outside: Tensor) -> float:
    """Area under the ROC curve separating in-distribution (positive) from OOD scores (ties count half)."""
    ranks = rankdata(torch.cat([inside, outside]).double().numpy())
    n_in, n_out = len(inside), len(outside)
    return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def ood_auroc(model: nn.Module, inside: Tensor, outside: Tensor) -> float:
    """AUROC of ``model``'s in-distribution score on ``inside`` vs ``outside`` images."""
    return auroc(in_distribution_score(model, inside), in_distribution_score(model, outside))


def corrupt(images: Tensor, kind: str = "noise", severity: float = 0.3, seed: int = 0) -> Tensor:
    """A corrupted copy: ``noise`` adds Gaussian noise of std ``severity``; ``invert`` is ``1 - x``; ``blur`` box-
    blurs with a ``1 + 2 round(severity * 10)`` kernel; clipped to [0, 1]."""
    if kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        return (images + severity * torch.randn(images.shape, generator=gen)).clamp(0.0, 1.0)
    if kind == "invert":
        return 1.0 - images
    if kind == "blur":
        k = 1 + 2 * round(severity * 10)
        return nn.functional.avg_pool2d(images, k, stride=1, padding=k // 2, count_include_pad=False)
    raise ValueError(f"corrupt: unknown kind {kind!r}; choose noise, invert or blur")
