"""FAR's replacement of a self-attention block: a multi-head bidirectional LSTM (``LSTMAttention``).

``pre_proj`` (a linear over all channels), then one bidirectional LSTM per head over that head's slice of the
channels, then ``proj`` (a linear from every head's forward and backward states to the output width). The
official code trains one LSTM whose weights are masked block-diagonal by head and deploys it as one LSTM per head
(``ParallelLSTM``); the two compute the same function, and this module is the per-head form throughout, so a
head's hidden units can be removed for real (``remove_units``). A padded text batch runs packed: the backward
direction starts at each sequence's last real token, as the attention it replaces never looked at padding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bitsmith.nn.base import register_compressed


def real_lengths(attention_mask: Tensor | None, batch: int, tokens: int) -> Tensor | None:
    """Each sequence's real-token count from an encoder's attention mask (2-D ``0/1``, or the 4-D boolean /
    additive mask Hugging Face passes its attention modules); None when nothing is padded. Padding must be on
    the right."""
    if attention_mask is None:
        return None
    mask = attention_mask
    if mask.dim() == 4:  # (batch, 1, queries, keys): the first query's row holds the key mask
        mask = mask[:, 0, 0, :]
    keep = mask if mask.dtype == torch.bool else (mask > torch.finfo(mask.dtype).min / 2 if mask.is_floating_point()
                                                 else mask != 0)  # fmt: skip
    keep = keep.expand(batch, tokens)
    if bool(keep.all()):
        return None
    lengths = keep.sum(-1)
    if not bool((keep == (torch.arange(tokens, device=keep.device) < lengths[:, None])).all()):
        raise ValueError("LSTMAttention needs right-padded batches (real tokens first); pad on the right "
                         "(the tokenizer's padding_side='right')")  # fmt: skip
    return lengths.clamp(min=1)


@register_compressed
class LSTMAttention(nn.Module):
    """``proj(concat_h BiLSTM_h(pre_proj(x)[..., head h]))``; ``hidden[h]`` units per head and direction."""

    def __init__(self, dim: int, heads: int, hidden: list[int], out_dim: int, returns_tuple: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"LSTMAttention: width {dim} does not split into {heads} heads")
        if len(hidden) != heads or min(hidden) < 1:
            raise ValueError(f"LSTMAttention: hidden {hidden} must give every one of the {heads} heads >= 1 unit")
        self.dim, self.heads, self.out_dim, self.returns_tuple = dim, heads, out_dim, returns_tuple
        self.pre_proj = nn.Linear(dim, dim)
        self.lstms = nn.ModuleList(nn.LSTM(dim // heads, h, batch_first=True, bidirectional=True) for h in hidden)
        self.proj = nn.Linear(2 * sum(hidden), out_dim)

    @property
    def hidden(self) -> list[int]:
        return [lstm.hidden_size for lstm in self.lstms]

    # -- checkpoints ------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "dim": self.dim, "heads": self.heads, "hidden": self.hidden,
                "out_dim": self.out_dim, "returns_tuple": self.returns_tuple}  # fmt: skip

    @classmethod
    def from_spec(cls, module: nn.Module, spec: dict[str, Any]) -> LSTMAttention:
        """Built in place of the attention ``module`` (its weights are loaded next)."""
        hidden = [int(h) for h in spec["hidden"]]
        return cls(int(spec["dim"]), int(spec["heads"]), hidden, int(spec["out_dim"]), bool(spec["returns_tuple"]))

    def to_float(self) -> nn.Module:
        return self  # already plain torch modules

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        batch, tokens, _ = x.shape
        lengths = real_lengths(attention_mask, batch, tokens)
        outs = []
        for lstm, chunk in zip(self.lstms, self.pre_proj(x).chunk(self.heads, dim=-1), strict=True):
            if lengths is None:
                outs.append(lstm(chunk)[0])  # (batch, tokens, 2 * hidden_h): [forward | backward]
            else:
                packed = pack_padded_sequence(chunk, lengths.cpu(), batch_first=True, enforce_sorted=False)
                outs.append(pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=tokens)[0])
        out = self.proj(torch.cat(outs, dim=-1))
        return (out, None) if self.returns_tuple else out

    # -- structure ----------------------------------------------------------------------------
    def unit_groups(self) -> list[Tensor]:
        """Per head, every hidden unit's weights (``hidden_h x n``): in both directions its four gates' input and
        recurrent rows, its recurrent column and its ``proj`` column — everything that leaves with the unit."""
        groups, start = [], 0
        for lstm in self.lstms:
            h = lstm.hidden_size
            parts = []
            for suffix, offset in (("_l0", 0), ("_l0_reverse", h)):
                ih = getattr(lstm, "weight_ih" + suffix).view(4, h, -1).transpose(0, 1).reshape(h, -1)
                hh = getattr(lstm, "weight_hh" + suffix).view(4, h, h)
                parts += [ih, hh.transpose(0, 1).reshape(h, -1), hh.permute(2, 0, 1).reshape(h, -1),
                          self.proj.weight[:, start + offset : start + offset + h].t()]  # fmt: skip
            groups.append(torch.cat(parts, dim=1))
            start += 2 * h
        return groups

    @torch.no_grad()
    def remove_units(self, keep: list[Tensor]) -> None:
        """Keep, per head, the hidden units where ``keep[h]`` is True (in both directions); the rest leave."""
        columns, start = [], 0
        for index, (lstm, kept) in enumerate(zip(self.lstms, keep, strict=True)):
            h, rows = lstm.hidden_size, kept.nonzero().flatten()
            fresh = nn.LSTM(lstm.input_size, len(rows), batch_first=True, bidirectional=True)
            gate_rows = torch.cat([g * h + rows for g in range(4)])
            for suffix in ("_l0", "_l0_reverse"):
                getattr(fresh, "weight_ih" + suffix).copy_(getattr(lstm, "weight_ih" + suffix)[gate_rows])
                getattr(fresh, "weight_hh" + suffix).copy_(getattr(lstm, "weight_hh" + suffix)[gate_rows][:, rows])
                for name in ("bias_ih", "bias_hh"):
                    getattr(fresh, name + suffix).copy_(getattr(lstm, name + suffix)[gate_rows])
            columns += [start + rows, start + h + rows]
            start += 2 * h
            self.lstms[index] = fresh
        columns_kept = torch.cat(columns)
        proj = nn.Linear(len(columns_kept), self.out_dim)
        proj.weight.copy_(self.proj.weight[:, columns_kept])
        proj.bias.copy_(self.proj.bias)
        self.proj = proj


def lstm_attention_params(dim: int, heads: int, hidden: list[int], out_dim: int) -> int:
    """Parameters of an ``LSTMAttention`` with these widths (``pre_proj``, the LSTMs, ``proj``)."""
    width = dim // heads
    lstms = sum(2 * (4 * h * (width + h) + 8 * h) for h in hidden)
    return dim * dim + dim + lstms + 2 * sum(hidden) * out_dim + out_dim
