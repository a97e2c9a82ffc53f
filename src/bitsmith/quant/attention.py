"""Int8 attention in the fake-quant model: both attention matmuls on 8-bit grids that an int8 GEMM can run.

``Q K^T``: query and key rows (one per token and head) on symmetric int8 grids with per-token scales, which factor
out of the sum over the head dimension. ``P V``: the softmax probabilities (computed in float) on the unsigned
8-bit grid of step 1/255, and the value columns (one per head channel) on symmetric int8 grids with per-channel
scales (the sum runs over tokens, so value scales cannot be per token). Dynamic scales: nothing to calibrate.

This is the quality side of int8 attention: ``enable_int8_attention`` (or PTQ's ``int8_attention: true``)
switches a Hugging Face model to it so its effect on accuracy can be measured; a checkpoint records the switch and
``load`` makes it again. Running it in integer kernels needs torchao's int8 SDPA, an AVX-512 template (see
``docs/deploy.md``): a deployed graph computes the same grids with float kernels (``deploy`` says so).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NAME = "bitsmith_int8"
LEVELS = 127  # symmetric int8: codes -127..127


def symmetric_codes(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(codes, scale)`` of ``x`` on a symmetric int8 grid, one scale per slice along ``dim`` (its absolute max)."""
    scale = x.abs().amax(dim, keepdim=True).clamp(min=1e-12) / LEVELS
    return (x / scale).round().clamp(-LEVELS, LEVELS), scale


def probability_codes(p: Tensor) -> Tensor:
    """Softmax probabilities as uint8 codes of step 1/255."""
    return (p * 255).round()


def int8_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """A Hugging Face attention function (``(batch, heads, tokens, dim)`` inputs): scaled dot-product attention
    with both matmuls on 8-bit grids. Returns the output ``(batch, tokens, heads, dim)`` and the quantized probabilities."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    q, q_scale = symmetric_codes(query, -1)  # per token
    k, k_scale = symmetric_codes(key, -1)  # per token
    v, v_scale = symmetric_codes(value, -2)  # per channel (over the tokens)
    scores = (q @ k.transpose(2, 3)) * (q_scale * k_scale.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = F.softmax(scores.float(), dim=-1).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    p = probability_codes(probs)
    out = (p @ v) * (v_scale / 255)
    return out.transpose(1, 2).contiguous(), p / 255


def enable_int8_attention(model: nn.Module) -> nn.Module:
    """Switch a Hugging Face model's attention to :func:`int8_attention_forward` (in place); refuses other models."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise ValueError(f"int8 attention: {type(model).__name__} is not a Hugging Face model with an attention "
                         "implementation to switch; it applies to transformers models (BERT, Llama, ...)")  # fmt: skip
    AttentionInterface.register(NAME, int8_attention_forward)
    AttentionMaskInterface.register(NAME, eager_mask)  # an additive float mask, as eager attention gets
    model.set_attn_implementation(NAME)  # type: ignore[operator]
    return model


def uses_int8_attention(model: nn.Module) -> bool:
    """Whether ``model`` (a Hugging Face model or not) computes its attention with :func:`int8_attention_forward`."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME
