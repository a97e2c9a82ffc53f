"""Quantization-aware token pruning, training-free (after SQAP-VLA, Fang, Liu, Du, Du and Yang 2025): tokens are
dropped inside a quantized transformer, before block ``at``, by the class token's attention in that block — the
criterion a quantized model computes for itself — with SQAP-VLA's rules that stay reliable under quantization
(:func:`bitsmith.nn.tokens.sqap_index`):

* *quantization-insensitive preservation*: quantization scatters and shifts attention maps, but the few most
  attended tokens keep their rank, so only the top ``preserve`` share of the budget is chosen by attention;
* *spatially-aware sampling*: the rest of the budget is spread evenly over the remaining patches (raster order), so
  the kept tokens cover the image instead of following the quantized map's noisy middle;
* *robot-aware protection*: the ``protect`` patches (positions known to matter) always stay.

SQAP-VLA's quantizer change, a Hadamard rotation that keeps the quantized attention closer to the float one, is the
``hadamard`` method: list ``[hadamard, ptq, sqap]``. ``criterion: top`` keeps the ``keep`` most attended tokens of
the quantized model (naive quantize-then-prune), the baseline at the same kept count and place, hence the same speed.

Deviations, stated: SQAP-VLA prunes the visual tokens of a VLA's language model (OpenVLA on LIBERO) by the task
query's attention; here the patch tokens of a ViT classifier by the class token's attention, averaged over heads.
Its robot-aware protection projects the arm's known 3D position into the image; a classifier has no such prior, so
``protect`` takes fixed patch indices and defaults to none. The paper's text gives no sampling stride or top-k share:
``preserve`` is ours (its measured effect is on the results page). Tokens are dropped, not merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from bitsmith.method import Method, register_method
from bitsmith.nn.encoder_tokens import PrunedEncoder
from bitsmith.nn.tokens import PrunedBlock, TokenPruner
from bitsmith.swap import set_submodule
from bitsmith.topology.attention import attention_sites, vit_patch_tokens


@register_method("sqap")
@dataclass
class SQAP(Method):
    """Training-free token pruning inside a (quantized) ViT by quantization-aware attention criteria."""

    description = "SQAP-VLA: quantization-aware token pruning (top attention preserved, the rest sampled evenly)"
    # a ViT's patch tokens (PrunedBlock) or a BERT-style encoder's tokens (PrunedEncoder)

    keep: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    at: Annotated[int, Field(ge=0)] = 1
    criterion: Literal["sqap", "top"] = "sqap"
    preserve: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25
    protect: list[Annotated[int, Field(ge=0)]] = field(default_factory=list)

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        sites = attention_sites(model)
        if self.at >= len(sites):
            raise ValueError(f"sqap: at {self.at} — the model has {len(sites)} blocks; choose 0..{len(sites) - 1}")
        if sites[0].returns_tuple:  # a Hugging Face encoder: its layers run behind a pruning wrapper
            return self.prepare_encoder(model, sites[0].block.rsplit(".layer.", 1)[0])
        tokens = vit_patch_tokens(model)
        keep = max(1, round(self.keep * tokens))
        bad = [i for i in self.protect if i >= tokens]
        if bad or len(set(self.protect)) != len(self.protect) or len(self.protect) > keep:
            raise ValueError(f"sqap: protect {self.protect[:8]} — give distinct patch indices in 0..{tokens - 1}, "
                             f"at most the {keep} kept tokens")  # fmt: skip
        site = sites[self.at]
        pruner = TokenPruner(site.dim, keep, 1, self.criterion, self.preserve, tuple(self.protect))
        wrapped = PrunedBlock(model.get_submodule(site.block), pruner)
        set_submodule(model, site.block, wrapped)
        return {site.block: wrapped.spec()}

    def prepare_encoder(self, model: nn.Module, name: str) -> dict[str, dict[str, Any]]:
        if self.protect:
            raise ValueError(f"sqap: protect {self.protect[:8]} — fixed positions mean patches; a text encoder's "
                             "sequences differ in length: remove protect")  # fmt: skip
        wrapped = PrunedEncoder(model.get_submodule(name), self.at, self.keep, self.criterion, self.preserve)
        set_submodule(model, name, wrapped)
        return {name: wrapped.spec()}


def kept_overlap(model: nn.Module, reference: nn.Module, images: torch.Tensor) -> float:
    """Mean Jaccard overlap of the patch sets that ``model``'s pruner keeps on ``images`` reading its own block's
    attention and reading ``reference``'s (e.g. the FP32 copy of that block): how far quantization moved the choice."""
    wrapped = next(m for m in model.modules() if isinstance(m, PrunedBlock))
    chosen = []
    try:
        with torch.no_grad():
            for criterion in (None, reference):
                wrapped.read_criterion_from(criterion)
                model(images)
                kept = nn.functional.one_hot(wrapped.pruner.last_index, int(model.pos_embed.shape[1]) - 1)
                chosen.append(kept.sum(1).bool())
    finally:
        wrapped.read_criterion_from(None)
    both, either = (chosen[0] & chosen[1]).sum(-1), (chosen[0] | chosen[1]).sum(-1)
    return float((both / either).mean())
