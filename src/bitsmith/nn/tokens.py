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
    """Reduces the patch tokens of ``x`` (batch x (1 + n) x d, class token first) to ``keep`` by ``mode``:

    * ``scorer``: a learned score per token (LayerNorm, linear, GELU, linear), then :func:`merge_tokens`;
    * ``attention`` (EViT-style baseline): the class token's attention to each patch in the block this pruner
      precedes; the ``keep`` most attended stay and the others are fused into one extra token, weighted by
      attention (so ``keep`` includes that token);
    * ``merge`` (ToMe-style baseline): rounds of bipartite soft matching (alternate tokens are the two sets; each
      token of the first set is merged into its most similar token of the second, the most similar pairs first,
      by size-weighted mean) until ``keep`` tokens remain.
    """

    def __init__(self, dim: int, keep: int, hidden: int, mode: str = "scorer") -> None:
        super().__init__()
        if mode not in ("scorer", "attention", "merge"):
            raise ValueError(f"token pruner mode {mode!r}: choose scorer, attention or merge")
        self.dim, self.keep, self.hidden, self.mode = dim, keep, hidden, mode
        self.scorer = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def scores(self, patches: Tensor) -> Tensor:
        return self.scorer(patches).squeeze(-1)  # (batch, n)

    def forward(self, x: Tensor, block: nn.Module | None = None) -> Tensor:
        cls, patches = x[:, :1], x[:, 1:]
        if self.keep >= patches.shape[1]:
            return x
        if self.mode == "attention":
            if block is None:
                raise ValueError("the attention pruner needs the block it precedes")
            reduced = fuse_inattentive(patches, class_attention(block, x), self.keep)
        elif self.mode == "merge":
            reduced = bipartite_merge(patches, self.keep)
        else:
            reduced = merge_tokens(patches, self.scores(patches), self.keep)
        return torch.cat([cls, reduced], dim=1)


def class_attention(block: nn.Module, x: Tensor) -> Tensor:
    """The class token's attention to each patch in a zoo ViT block (``norm1``, ``attn``), mean over heads."""
    from bitsmith.eval.attention import vit_attention_probs

    return vit_attention_probs(block.attn, block.norm1(x))[:, :, 0, 1:].mean(1)  # (batch, n)


def fuse_inattentive(patches: Tensor, attention: Tensor, keep: int) -> Tensor:
    """EViT: the ``keep - 1`` most attended patches stay (in order); the rest become one attention-weighted token."""
    b, n, d = patches.shape
    order = attention.argsort(dim=1, descending=True)
    kept_index = order[:, : keep - 1].sort(dim=1).values
    rest = order[:, keep - 1 :]
    kept = patches.gather(1, kept_index[..., None].expand(-1, -1, d))
    weight = attention.gather(1, rest)
    pruned = patches.gather(1, rest[..., None].expand(-1, -1, d))
    fused = (weight[..., None] * pruned).sum(1, keepdim=True) / weight.sum(1, keepdim=True)[..., None].clamp(min=1e-12)
    return torch.cat([kept, fused], dim=1)


def bipartite_merge(patches: Tensor, keep: int) -> Tensor:
    """ToMe's bipartite soft matching, repeated until ``keep`` tokens remain (size-weighted means)."""
    tokens, size = patches, torch.ones(patches.shape[:2], device=patches.device)
    while tokens.shape[1] > keep:
        a, b = tokens[:, ::2], tokens[:, 1::2]
        size_a, size_b = size[:, ::2], size[:, 1::2]
        r = min(tokens.shape[1] - keep, a.shape[1])
        similarity = nn.functional.normalize(a, dim=-1) @ nn.functional.normalize(b, dim=-1).transpose(1, 2)
        best, partner = similarity.max(-1)  # (batch, |a|)
        order = best.argsort(dim=1, descending=True)
        merged, stay = order[:, :r], order[:, r:]
        d = tokens.shape[-1]
        into = partner.gather(1, merged)
        total = (b * size_b[..., None]).scatter_add(
            1, into[..., None].expand(-1, -1, d), (a * size_a[..., None]).gather(1, merged[..., None].expand(-1, -1, d))
        )
        mass = size_b.scatter_add(1, into, size_a.gather(1, merged))
        kept_a = a.gather(1, stay[..., None].expand(-1, -1, d))
        tokens = torch.cat([kept_a, total / mass[..., None]], dim=1)
        size = torch.cat([size_a.gather(1, stay), mass], dim=1)
    return tokens


@register_compressed
class PrunedBlock(nn.Module):
    """``block(pruner(x))``: the token pruner in front of a transformer block."""

    def __init__(self, block: nn.Module, pruner: TokenPruner) -> None:
        super().__init__()
        self.pruner, self.block = pruner, block

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.pruner(x, self.block))

    def spec(self) -> dict[str, Any]:
        p = self.pruner
        return {"type": type(self).__name__, "dim": p.dim, "keep": p.keep, "hidden": p.hidden, "mode": p.mode}

    @classmethod
    def from_spec(cls, module: nn.Module, spec: dict[str, Any]) -> PrunedBlock:
        pruner = TokenPruner(int(spec["dim"]), int(spec["keep"]), int(spec["hidden"]), str(spec.get("mode", "scorer")))
        return cls(module, pruner)

    def to_float(self) -> nn.Module:
        return self
