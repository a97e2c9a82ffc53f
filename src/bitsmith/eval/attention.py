"""How sparse each layer's attention is on real inputs (issue 41's measure: sparser layers should be cheaper to
replace, and token pruning keeps the keys that hold the mass).

Two numbers per layer, averaged over heads, queries and examples: the attention distribution's entropy divided by
``log(keys)`` (1: uniform, 0: one key), and the probability mass of its ``top_k`` keys. The zoo ViT computes
attention with a fused kernel, so its probabilities are recomputed from the block's own query / key projection
(``softmax(q k^T * scale)``); a Hugging Face encoder returns them itself (``output_attentions``, eager attention).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


def entropy_and_top_mass(probs: Tensor, top_k: int) -> tuple[float, float]:
    """``probs`` (``... x keys``, rows summing to 1): mean normalised entropy and mean mass of the top ``top_k``."""
    keys = probs.shape[-1]
    if not 1 <= top_k <= keys:
        raise ValueError(f"top_k {top_k}: choose 1..{keys} (the number of keys)")
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1) / max(torch.log(torch.tensor(float(keys))), 1e-12)
    mass = probs.topk(top_k, -1).values.sum(-1)
    return float(entropy.mean()), float(mass.mean())


def vit_attention_probs(attention: nn.Module, x: Tensor) -> Tensor:
    """The zoo ViT attention block's probabilities (``batch x heads x tokens x tokens``) for its input ``x``."""
    b, n, _ = x.shape
    rows = attention.heads * attention.qk_dim
    q, k, _ = attention.qkv(x).split([rows, rows, attention.heads * attention.v_dim], dim=-1)
    q, k = (t.reshape(b, n, attention.heads, attention.qk_dim).transpose(1, 2) for t in (q, k))
    return torch.softmax(q @ k.transpose(-1, -2) * attention.scale, -1)


@torch.no_grad()
def attention_sparsity(model: nn.Module, batches: Iterable[Any], top_k: int = 4) -> dict[str, dict[str, float]]:
    """Per attention layer: ``entropy`` (normalised) and ``top_mass`` (of ``top_k`` keys) on ``batches``; zoo
    ViT blocks by their ``attn`` modules, Hugging Face encoders by layer index."""
    sums: dict[str, list[float]] = {}

    def add(name: str, probs: Tensor) -> None:
        entropy, mass = entropy_and_top_mass(probs.float(), min(top_k, probs.shape[-1]))
        total = sums.setdefault(name, [0.0, 0.0, 0.0])
        total[0], total[1], total[2] = total[0] + entropy, total[1] + mass, total[2] + 1

    vit = {n: m for n, m in model.named_modules() if type(m).__name__ == "Attention" and hasattr(m, "qkv")}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: add(n, vit_attention_probs(mod, a[0])))
               for n, m in vit.items()]  # fmt: skip
    config = getattr(model, "config", None)
    kernel = getattr(config, "_attn_implementation", None)
    if kernel not in (None, "eager"):
        model.set_attn_implementation("eager")  # fused kernels return no probabilities
    try:
        for batch in batches:
            if isinstance(batch, dict):  # a Hugging Face encoder: its own probabilities
                out = model(**batch, output_attentions=True)
                for i, probs in enumerate(out.attentions):
                    add(f"layer.{i}", probs)
            else:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for h in handles:
            h.remove()
        if kernel not in (None, "eager"):
            model.set_attn_implementation(kernel)
    return {name: {"entropy": t[0] / t[2], "top_mass": t[1] / t[2]} for name, t in sums.items()}
