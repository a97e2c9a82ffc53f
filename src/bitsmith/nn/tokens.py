"""Fewer tokens before the first transformer block (token-prune, after PaceVGGT): a light scorer rates each patch
token, the ``keep`` best stay, and every other token is merged into the kept token it is most similar to, weighted by
importance, so the backbone sees a fixed shorter sequence and no token's content is simply dropped.

``TokenPruner`` is the scorer and the merge; ``PrunedBlock`` runs it in front of a block (the first one), which is how
a checkpoint records it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.nn.base import register_compressed


def merge_tokens(patches: Tensor, scores: Tensor, keep: int) -> Tensor:
    """``patches`` (batch x n x d) reduced to ``keep`` tokens: the ``keep`` highest ``scores`` (in their original order)
    each become the importance-weighted mean (weights ``softmax(scores)``) of themselves and of the pruned tokens
    most similar to them (cosine)."""
    b, n, d = patches.shape
    kept_index = scores.topk(keep, dim=1).indices.sort(dim=1).values  # (b, keep)
    kept = patches.gather(1, kept_index[..., None].expand(-1, -1, d))
    similarity = nn.functional.normalize(patches, dim=-1) @ nn.functional.normalize(kept, dim=-1).transpose(1, 2)
    target = similarity.argmax(-1)  # (b, n): the kept token each token joins
    target = target.scatter(1, kept_index, torch.arange(keep, device=patches.device).expand(b, -1))
    weight = scores.softmax(dim=1)  # (b, n) importance
    total = patches.new_zeros(b, keep, d).scatter_add(
        1, target[..., None].expand(-1, -1, d), weight[..., None] * patches
    )
    mass = patches.new_zeros(b, keep).scatter_add(1, target, weight)
    return total / mass[..., None].clamp(min=1e-12)


class TokenPruner(nn.Module):
    """Scores the patch tokens of ``x`` (batch x (1 + n) x d, class token first) and keeps ``keep`` merged ones."""

    def __init__(self, dim: int, keep: int, hidden: int) -> None:
        super().__init__()
        self.dim, self.keep, self.hidden = dim, keep, hidden
        self.scorer = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def scores(self, patches: Tensor) -> Tensor:
        return self.scorer(patches).squeeze(-1)  # (batch, n)

    def forward(self, x: Tensor) -> Tensor:
        cls, patches = x[:, :1], x[:, 1:]
        if self.keep >= patches.shape[1]:
            return x
        return torch.cat([cls, merge_tokens(patches, self.scores(patches), self.keep)], dim=1)


@register_compressed
class PrunedBlock(nn.Module):
    """``block(pruner(x))``: the token pruner in front of a transformer block."""

    def __init__(self, block: nn.Module, pruner: TokenPruner) -> None:
        super().__init__()
        self.pruner, self.block = pruner, block

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.pruner(x))

    def spec(self) -> dict[str, Any]:
        p = self.pruner
        return {"type": type(self).__name__, "dim": p.dim, "keep": p.keep, "hidden": p.hidden}

    @classmethod
    def from_spec(cls, module: nn.Module, spec: dict[str, Any]) -> PrunedBlock:
        return cls(module, TokenPruner(int(spec["dim"]), int(spec["keep"]), int(spec["hidden"])))

    def to_float(self) -> nn.Module:
        return self
