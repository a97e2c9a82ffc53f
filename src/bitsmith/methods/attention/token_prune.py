"""Token pruning before the first transformer block, after PaceVGGT's pre-attention pruning: a light scorer rates
the patch tokens from their embeddings, the ``keep`` share with the highest scores stay and every pruned token is
merged into the kept token it is most similar to (importance-weighted mean, :func:`bitsmith.nn.tokens.merge_tokens`),
so every block sees a fixed, shorter sequence (the class token always stays).

* ``calibrate`` distils the scorer from the unpruned model's attention importance: per image, the attention the
  class token pays each patch, averaged over heads and blocks, as a distribution over patches; the scorer's
  softmax learns it by KL divergence (``distill_steps`` Adam steps at ``lr``).
* training (the recipe's ``train``) refines the scorer on the task loss: the merge weights are ``softmax(scores)``,
  so the task gradient reaches the scorer through them, while the backbone adapts to the shorter sequence.

Deviations, stated: PaceVGGT prunes the frame tokens of VGGT (3D reconstruction) with an importance from its global
attention; here a classifier's patch tokens, with the class token's attention as importance (EViT's measure). The
merge assignment is cosine similarity of the embeddings. ``mode: attention`` (EViT-style: the class token's attention in the block the
pruner precedes, inattentive tokens fused into one) and ``mode: merge`` (ToMe-style bipartite soft matching) are the
baselines, at the same kept-token count and place (``at``, default before the first block).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.distill import frozen_copy
from bitsmith.eval.attention import vit_attention_probs
from bitsmith.method import Method, eval_mode, forward_with_hooks, register_method
from bitsmith.nn.tokens import PrunedBlock, TokenPruner
from bitsmith.swap import set_submodule
from bitsmith.topology.attention import attention_sites, vit_patch_tokens


@register_method("token-prune")
@dataclass
class TokenPrune(Method):
    """A learned token scorer before the first block; pruned tokens merged into kept ones."""

    description = "Token pruning before the first block (PaceVGGT-style scorer distilled from attention, merging)"

    keep: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    mode: Literal["scorer", "attention", "merge"] = "scorer"
    at: Annotated[int, Field(ge=0)] = 0
    hidden: Annotated[int, Field(ge=1)] | None = None
    distill_steps: Annotated[int, Field(ge=0)] = 300
    lr: Annotated[float, Field(gt=0.0)] = 1e-3
    seed: int = 0

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        tokens = vit_patch_tokens(model)
        sites = attention_sites(model)
        if self.at >= len(sites):
            raise ValueError(
                f"token-prune: at {self.at} — the model has {len(sites)} blocks; choose 0..{len(sites) - 1}"
            )
        site = sites[self.at]
        self._teacher = frozen_copy(model) if self.mode == "scorer" else None  # only the scorer distils
        self._first = site.block
        keep = max(2 if self.mode == "attention" else 1, round(self.keep * tokens))
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            pruner = TokenPruner(site.dim, keep, self.hidden or max(site.dim // 4, 1), self.mode)
        wrapped = PrunedBlock(model.get_submodule(site.block), pruner)
        set_submodule(model, site.block, wrapped)
        return {site.block: wrapped.spec()}

    def pruner(self, model: nn.Module) -> TokenPruner:
        return model.get_submodule(self._first).pruner  # type: ignore[return-value]

    def importance(self, batches: list[Any]) -> list[tuple[Tensor, Tensor]]:
        """Per batch, the patch embeddings the pruner sees and the unpruned model's importance of each patch (the
        class token's attention to it, averaged over heads and blocks, normalised to sum to 1)."""
        teacher, out = self._teacher, []
        seen: dict[str, Tensor] = {}
        maps: list[Tensor] = []
        hooks = {teacher.get_submodule(self._first): lambda m, args, output: seen.__setitem__("x", args[0])}
        hooks |= {teacher.get_submodule(s.site): lambda m, args, output: maps.append(
                      vit_attention_probs(m, args[0])[:, :, 0, 1:].mean(1))
                  for s in attention_sites(teacher)}  # fmt: skip
        for batch in batches:
            maps.clear()
            forward_with_hooks(teacher, batch, hooks)
            weight = torch.stack(maps).mean(0)  # (batch, n)
            out.append((seen["x"][:, 1:], weight / weight.sum(-1, keepdim=True)))
        return out

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        if self.mode != "scorer":  # the baselines have nothing to learn
            return
        targets = self.importance(list(batches))
        pruner = self.pruner(model)
        optimizer = torch.optim.Adam(pruner.scorer.parameters(), lr=self.lr)
        with torch.random.fork_rng(), eval_mode(model):
            torch.manual_seed(self.seed)
            for step in range(self.distill_steps if targets else 0):
                patches, target = targets[step % len(targets)]
                log_q = torch.log_softmax(pruner.scores(patches), dim=-1)
                loss = nn.functional.kl_div(log_q, target, reduction="batchmean")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "_teacher"}
