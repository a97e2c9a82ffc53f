"""Sparsity building blocks: regularisers (``shared/methods/deephoyer.md``) and pruning masks.

Regularisers of one weight tensor ``w`` (DeepHoyer's table): ``l1``, ``hoyer`` (``||w||_1 / ||w||_2``),
``hoyer-square`` (``||w||_1^2 / ||w||_2^2``, scale invariant, a smooth L0), ``transformed-l1``,
``group-lasso`` and ``group-hoyer-square`` over input-channel and output-channel groups. Masks: by
magnitude (per layer or one global threshold), N:M along the input dimension, and DeepHoyer's
``|w| > sensitivity * std(w)`` threshold. A mask is a bool tensor of the weight's shape (True = kept).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

EPS = 1e-12


def l1(w: Tensor) -> Tensor:
    return w.abs().sum()


def hoyer(w: Tensor) -> Tensor:
    return w.abs().sum() / (w.pow(2).sum().sqrt() + EPS)


def hoyer_square(w: Tensor) -> Tensor:
    return w.abs().sum().pow(2) / (w.pow(2).sum() + EPS)


def transformed_l1(w: Tensor) -> Tensor:
    return (2 * w.abs() / (1 + w.abs())).sum()


def group_norms(w: Tensor) -> tuple[Tensor, Tensor]:
    """L2 norms of the input-channel groups (dim 1) and of the output-channel groups (dim 0)."""
    if w.dim() < 2:
        raise ValueError(f"group regularisers need a weight with >= 2 dims, got shape {tuple(w.shape)}")
    dims_in = [d for d in range(w.dim()) if d != 1]
    dims_out = list(range(1, w.dim()))
    return w.pow(2).sum(dims_in).add(EPS).sqrt(), w.pow(2).sum(dims_out).add(EPS).sqrt()


def group_lasso(w: Tensor) -> Tensor:
    inputs, outputs = group_norms(w)
    return inputs.sum() + outputs.sum()


def group_hoyer_square(w: Tensor) -> Tensor:
    inputs, outputs = group_norms(w)
    return (inputs.sum().pow(2) + outputs.sum().pow(2)) / (w.pow(2).sum() + EPS)


REGULARIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "l1": l1,
    "hoyer": hoyer,
    "hoyer-square": hoyer_square,
    "transformed-l1": transformed_l1,
    "group-lasso": group_lasso,
    "group-hoyer-square": group_hoyer_square,
}
STRUCTURED = {"group-lasso", "group-hoyer-square"}


def magnitude_masks(weights: dict[str, Tensor], sparsity: float, scope: str = "global") -> dict[str, Tensor]:
    """Keep the largest ``1 - sparsity`` of |w|: one threshold over all layers (``global``) or per layer."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope == "layer":
        return {name: _keep_largest(w.abs().flatten(), sparsity).view_as(w) for name, w in weights.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    keep = _keep_largest(flat, sparsity)
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = keep[start : start + w.numel()].view_as(w)
        start += w.numel()
    return out


def _keep_largest(scores: Tensor, sparsity: float) -> Tensor:
    """Exactly ``round(sparsity * n)`` entries dropped (ties broken by position)."""
    drop = round(sparsity * scores.numel())
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    if drop:
        mask[torch.argsort(scores.detach(), stable=True)[:drop]] = False
    return mask


def nm_mask(w: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """N:M sparsity: in every group of ``m`` consecutive inputs of an output, keep the ``n`` largest |w|
    (for a convolution, groups run along the input channels at each kernel position)."""
    if w.dim() not in (2, 4):
        raise ValueError(f"N:M masks are defined for Linear (2-D) and Conv2d (4-D) weights, got {tuple(w.shape)}")
    rows = w.detach() if w.dim() == 2 else w.detach().permute(0, 2, 3, 1).reshape(-1, w.shape[1])
    if rows.shape[1] % m:
        raise ValueError(f"{m} does not divide the {rows.shape[1]} inputs; N:M needs a multiple of M")
    groups = rows.abs().reshape(rows.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, dim=-1).indices, True)
    keep = keep.reshape(rows.shape)
    if w.dim() == 2:
        return keep
    return keep.reshape(w.shape[0], w.shape[2], w.shape[3], w.shape[1]).permute(0, 3, 1, 2).contiguous()


def threshold_mask(w: Tensor, sensitivity: float) -> Tensor:
    """DeepHoyer's element-wise pruning: keep ``|w| > sensitivity * std(w)``."""
    return w.detach().abs() > sensitivity * w.detach().std()


def group_threshold_mask(w: Tensor, threshold: float) -> Tensor:
    """Structural pruning: zero the input and output channels whose group norm is below ``threshold``."""
    inputs, outputs = group_norms(w.detach())
    shape_in = [1, -1] + [1] * (w.dim() - 2)
    shape_out = [-1] + [1] * (w.dim() - 1)
    return ((inputs > threshold).view(shape_in) & (outputs > threshold).view(shape_out)).expand_as(w).clone()


def sparsity_of(mask: Tensor) -> float:
    return 1.0 - float(mask.float().mean())
