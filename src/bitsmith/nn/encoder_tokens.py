"""Token pruning inside a Hugging Face BERT-style encoder (SQAP on MiniLM): ``PrunedEncoder`` runs the encoder's
layers, and before layer ``at`` keeps ``keep`` of each sequence's tokens by the [CLS] query's attention in that layer
(``top``: the most attended; ``sqap``: :func:`bitsmith.nn.tokens.sqap_index` over the sequence's real tokens), so the
later layers run on a shorter sequence. [CLS] always stays; padding is never chosen while real tokens remain.

The output keeps the input's length so that the usual masked mean pooling reads it unchanged: the kept tokens go
back to their positions and every dropped real position holds the mean of the sequence's kept real tokens, so the
mean over the real positions is exactly the mean over the kept ones (what a pruned deployment pools)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.nn.base import register_compressed
from bitsmith.nn.tokens import SELECTIONS, select_index


def real_tokens(mask: Tensor | None, hidden: Tensor) -> Tensor:
    """(batch, n) True where a key is attended, from the encoder's 4-D mask (bool: True attends; float: 0 attends),
    all True without a mask."""
    if mask is None:
        return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    keys = mask[:, 0, 0, :]
    return keys if keys.dtype == torch.bool else keys == 0


def cls_attention(attention: nn.Module, hidden: Tensor, real: Tensor) -> Tensor:
    """The [CLS] query's attention over the keys in a BERT self-attention module, mean over heads (batch, n)."""
    b, n, _ = hidden.shape
    heads, size = attention.num_attention_heads, attention.attention_head_size
    q = attention.query(hidden[:, :1]).view(b, 1, heads, size).transpose(1, 2)
    k = attention.key(hidden).view(b, n, heads, size).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)).squeeze(2) * size**-0.5  # (b, heads, n)
    return scores.masked_fill(~real[:, None, :], float("-inf")).softmax(-1).mean(1)


def choose(attention: Tensor, real: Tensor, keep: float, mode: str, preserve: float) -> Tensor:
    """Per sequence, the kept positions (sorted; [CLS] first): ``round(keep x tokens after [CLS])`` of them, chosen
    among the real tokens after [CLS] (``top`` or ``sqap``), padding positions appended when too few are real."""
    b, n = attention.shape
    count = max(1, round(keep * (n - 1)))
    rows = []
    for row in range(b):
        length = int(real[row, 1:].sum())  # real tokens after [CLS] (right padding)
        take = min(count, length)
        scores = attention[row : row + 1, 1 : 1 + length]
        picked = select_index(scores, take, mode, preserve)[0] + 1
        pads = torch.arange(1 + length, 1 + length + count - take, device=attention.device)
        rows.append(torch.cat([torch.zeros(1, dtype=torch.long, device=attention.device), picked, pads]))
    return torch.stack(rows)  # (b, 1 + count)


def gather_mask(mask: Tensor | None, index: Tensor) -> Tensor | None:
    """The encoder's 4-D mask restricted to the kept positions (keys, and queries when the mask has them)."""
    if mask is None:
        return None
    b, heads, queries, _ = mask.shape
    mask = mask.gather(3, index[:, None, None, :].expand(b, heads, queries, -1))
    if queries > 1:
        mask = mask.gather(2, index[:, None, :, None].expand(b, heads, -1, mask.shape[3]))
    return mask


@register_compressed
class PrunedEncoder(nn.Module):
    """``encoder`` (``.layer``: BERT layers) with tokens dropped before layer ``at``."""

    def __init__(self, encoder: nn.Module, at: int, keep: float, mode: str = "sqap", preserve: float = 0.25) -> None:
        super().__init__()
        if mode not in SELECTIONS:
            raise ValueError(f"encoder token pruning mode {mode!r}: choose {' or '.join(sorted(SELECTIONS))}")
        self.encoder, self.at, self.keep, self.mode, self.preserve = encoder, at, keep, mode, preserve

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                cache: Any = None, use_cache: bool | None = None, **kwargs: Any) -> Any:  # fmt: skip
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        full, real, index = hidden_states, real_tokens(attention_mask, hidden_states), None
        for i, layer in enumerate(self.encoder.layer):
            if i == self.at:
                attention = cls_attention(layer.attention.self, hidden_states, real)
                index = choose(attention, real, self.keep, self.mode, self.preserve)
                self.last_index = index  # the positions kept in the last call (an analysis read, not state)
                hidden_states = hidden_states.gather(1, index[..., None].expand(-1, -1, hidden_states.shape[-1]))
                attention_mask = gather_mask(attention_mask, index)
            hidden_states = layer(hidden_states, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask=encoder_attention_mask, cache=cache, **kwargs)  # fmt: skip
        if index is not None:
            hidden_states = self.restore_length(full, hidden_states, index, real)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states)

    @staticmethod
    def restore_length(full: Tensor, kept: Tensor, index: Tensor, real: Tensor) -> Tensor:
        """``kept`` back at ``index`` in a tensor of ``full``'s shape; the dropped real positions get the mean of
        the kept real tokens (so a masked mean over the real positions equals the mean over the kept ones)."""
        kept_real = real.gather(1, index)[..., None].to(kept.dtype)  # (b, k, 1)
        mean = (kept * kept_real).sum(1, keepdim=True) / kept_real.sum(1, keepdim=True).clamp(min=1)
        out = mean.expand_as(full).clone()
        return out.scatter(1, index[..., None].expand(-1, -1, kept.shape[-1]), kept)

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "at": self.at, "keep": self.keep, "mode": self.mode,
                "preserve": self.preserve}  # fmt: skip

    @classmethod
    def from_spec(cls, module: nn.Module, spec: dict[str, Any]) -> PrunedEncoder:
        return cls(module, int(spec["at"]), float(spec["keep"]), str(spec["mode"]), float(spec["preserve"]))

    def to_float(self) -> nn.Module:
        return self
