"""Fewer tokens before the first transformer block (token-prune, after PaceVGGT): a light scorer rates each patch
token, the ``keep`` best stay, and every other token is merged into the kept token it is most similar to, weighted by
importance, so the backbone sees a fixed shorter sequence and no token's content is simply dropped.

``TokenPruner`` is the scorer and the merge; ``PrunedBlock`` runs it in front of a block (the first one), which is how
a checkpoint records it. The same pruner also drops tokens inside the network by the class token's attention in the
block it precedes (``top``: the most attended; ``sqap``: SQAP-VLA's quantization-aware rule, :func:`sqap_index`)."""

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


def top_index(attention: Tensor, keep: int) -> Tensor:
    """The ``keep`` most attended patches per image (``attention``: batch x n), in their original order."""
    return attention.topk(keep, dim=1).indices.sort(dim=1).values


def sqap_index(attention: Tensor, keep: int, preserve: float, protect: tuple[int, ...] = ()) -> Tensor:
    """SQAP-VLA's quantization-aware selection of ``keep`` patches per image (in their original order):

    1. the ``protect`` patches always stay (the robot-aware protection: positions known to matter, whatever the
       attention says);
    2. *quantization-insensitive preservation*: the ``round(preserve * keep)`` most attended of the rest stay — under
       quantization only the order of the top of the attention survives;
    3. *spatially-aware sampling*: the rest of the budget is spread evenly over the remaining patches in raster order
       (rank ``floor((i + 1/2) * remaining / needed)``), so the kept set covers the image instead of following the
       scattered, shifted middle of a quantized attention map."""
    b, n = attention.shape
    taken = torch.zeros(b, n, dtype=torch.bool, device=attention.device)
    if protect:
        taken[:, list(protect)] = True
    room = keep - len(protect)
    top = min(room, round(preserve * keep))
    if top > 0:
        score = attention.masked_fill(taken, float("-inf"))
        taken.scatter_(1, score.topk(top, dim=1).indices, True)
    needed = room - top
    if needed > 0:
        position = torch.arange(n, device=attention.device).expand(b, -1)
        free = torch.where(taken, position + n, position).sort(dim=1).values[:, : n - keep + needed]  # free, in order
        ranks = ((torch.arange(needed, device=attention.device) + 0.5) * free.shape[1] / needed).long()
        taken.scatter_(1, free[:, ranks], True)
    return taken.nonzero()[:, 1].reshape(b, keep)


SELECTIONS = {"top", "sqap"}


def select_index(attention: Tensor, keep: int, mode: str, preserve: float, protect: tuple[int, ...] = ()) -> Tensor:
    """The ``keep`` positions per row that ``mode`` chooses from ``attention``: :func:`top_index` (``top``) or
    :func:`sqap_index` (``sqap``, with ``preserve`` and ``protect``)."""
    return top_index(attention, keep) if mode == "top" else sqap_index(attention, keep, preserve, protect)


class TokenPruner(nn.Module):
    """Reduces the patch tokens of ``x`` (batch x (1 + n) x d, class token first) to ``keep`` by ``mode``:

    * ``scorer``: a learned score per token (LayerNorm, linear, GELU, linear), then :func:`merge_tokens`;
    * ``attention`` (EViT-style baseline): the class token's attention to each patch in the block this pruner
      precedes; the ``keep`` most attended stay and the others are fused into one extra token, weighted by
      attention (so ``keep`` includes that token);
    * ``merge`` (ToMe-style baseline): rounds of bipartite soft matching (alternate tokens are the two sets; each
      token of the first set is merged into its most similar token of the second, the most similar pairs first,
      by size-weighted mean) until ``keep`` tokens remain;
    * ``top`` / ``sqap`` (training-free, inside the network): the class token's attention in the block this pruner
      precedes picks the ``keep`` patches (:func:`top_index` / :func:`sqap_index` with ``preserve`` and
      ``protect``); the others are dropped. No scorer is built.
    """

    def __init__(
        self, dim: int, keep: int, hidden: int, mode: str = "scorer", preserve: float = 1.0,
        protect: tuple[int, ...] = (),
    ) -> None:  # fmt: skip
        super().__init__()
        if mode not in ("scorer", "attention", "merge", *sorted(SELECTIONS)):
            raise ValueError(f"token pruner mode {mode!r}: choose scorer, attention, merge, top or sqap")
        self.dim, self.keep, self.hidden, self.mode = dim, keep, hidden, mode
        self.preserve, self.protect = preserve, tuple(protect)
        if mode not in SELECTIONS:
            self.scorer = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def scores(self, patches: Tensor) -> Tensor:
        return self.scorer(patches).squeeze(-1)  # (batch, n)

    def forward(self, x: Tensor, block: nn.Module | None = None) -> Tensor:
        cls, patches = x[:, :1], x[:, 1:]
        if self.keep >= patches.shape[1]:
            return x
        if self.mode in ("attention", *SELECTIONS) and block is None:
            raise ValueError(f"the {self.mode} pruner needs the block it precedes")
        if self.mode in SELECTIONS:
            index = select_index(class_attention(block, x), self.keep, self.mode, self.preserve, self.protect)
            self.last_index = index  # the patches kept in the last call (an analysis read, not state)
            reduced = patches.gather(1, index[..., None].expand(-1, -1, patches.shape[-1]))
        elif self.mode == "attention":
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
    """``block(pruner(x))``: the token pruner in front of a transformer block. An attention-reading pruner reads the
    block's own attention, or that of the block given to :meth:`read_criterion_from` (an analysis hook, not saved:
    e.g. the FP32 copy of a quantized block, to see which tokens the unquantized criterion would keep)."""

    def __init__(self, block: nn.Module, pruner: TokenPruner) -> None:
        super().__init__()
        self.pruner, self.block = pruner, block
        self._criterion: tuple[nn.Module, ...] = ()  # a tuple: not a submodule, never saved

    def read_criterion_from(self, block: nn.Module | None) -> None:
        """Read the pruning criterion from ``block`` (None: the wrapped block again)."""
        self._criterion = (block,) if block is not None else ()

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.pruner(x, self._criterion[0] if self._criterion else self.block))

    def spec(self) -> dict[str, Any]:
        p = self.pruner
        spec = {"type": type(self).__name__, "dim": p.dim, "keep": p.keep, "hidden": p.hidden, "mode": p.mode}
        return spec | ({"preserve": p.preserve, "protect": list(p.protect)} if p.mode in SELECTIONS else {})

    @classmethod
    def from_spec(cls, module: nn.Module, spec: dict[str, Any]) -> PrunedBlock:
        protect = tuple(int(i) for i in spec.get("protect", []))
        pruner = TokenPruner(int(spec["dim"]), int(spec["keep"]), int(spec["hidden"]), str(spec.get("mode", "scorer")),
                             float(spec.get("preserve", 1.0)), protect)  # fmt: skip
        return cls(module, pruner)

    def to_float(self) -> nn.Module:
        return self
