"""CSQ's bi-level continuous-sparsification quantizer: sigmoid-relaxed bit values and bit selection.

A weight is ``step * sum_b M_b (sigmoid(beta p_b) - sigmoid(beta q_b)) 2^b`` over ``n_max`` bit
positions (b = 0 is the least significant), with real logits ``p``, ``q`` per weight and bit and one
selection logit ``m_b`` per layer and bit, ``M_b = sigmoid(beta m_b)``. No straight-through estimator:
the function is smooth, and as the temperature ``beta`` grows the sigmoids become step functions.
After the "ticket" the selection is hard (``M_b = 1[m_b >= 0]``, at least one bit per layer); ``harden()`` makes the whole weight
the exact step-function value, an exactly quantized sign-magnitude weight.

``step`` is the value of one least-significant bit (``s / (2^n - 1)`` in the paper's notation), its
gradient rescaled so SGD moves weights as on ``s`` (as in :mod:`bitsmith.quant.bitplane`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.quant.base import QUANTIZERS, Encoded
from bitsmith.quant.bitplane import SignMagnitude, to_planes
from bitsmith.quant.functional import grad_scale

HARD_LOGIT = 20.0  # |logit| of a hardened or restored bit: sigmoid(beta * 20) is 1 to float precision


@QUANTIZERS.register("csq")
class CSQQuantizer(SignMagnitude):
    """Weight quantizer owning the weight as relaxed bit logits (``pos``, ``neg``) and selection ``mask``."""

    kind = "csq"
    packed_exclude = ("pos", "neg")

    def __init__(self, bits: int = 6, mask_init: float = 0.0, logit_init: float = 1.0) -> None:
        super().__init__()
        if not 1 <= bits <= 16:
            raise ValueError(f"csq bits must be between 1 and 16, got {bits}")
        self.n_max, self.mask_init, self.logit_init = bits, mask_init, logit_init
        self.pos = nn.Parameter(torch.empty(0))
        self.neg = nn.Parameter(torch.empty(0))
        self.mask = nn.Parameter(torch.full((bits,), float(mask_init)))
        self.step = nn.Parameter(torch.empty(0))
        self.register_buffer("beta", torch.tensor(1.0))
        self.register_buffer("hard_mask", torch.tensor(False))  # after the ticket: M_b = 1[m_b > 0]
        self.register_buffer("hard", torch.tensor(False))  # finalized: every bit is a step function

    # -- precision ------------------------------------------------------------------------------
    def active(self) -> Tensor:
        """Bit positions selected now, ``(n_max,)`` bool (``M_b >= 0.5``); at least the one with the
        highest selection logit, so no layer's weight vanishes."""
        mask = self.mask.detach()
        return (mask >= 0) | (torch.arange(mask.numel(), device=mask.device) == mask.argmax())

    @property
    def active_bits(self) -> int:
        """The layer's precision in the paper's sense: the number of selected bit positions."""
        return int(self.active().sum())

    def _span(self) -> tuple[int, int]:
        """Lowest and highest selected positions (``active`` never selects none)."""
        idx = self.active().nonzero().flatten()
        return int(idx.min()), int(idx.max())

    @property
    def bits(self) -> int:
        """Stored magnitude bits: the span from the lowest to the highest selected position."""
        low, high = self._span()
        return high - low + 1

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "bits": self.n_max, "mask_init": self.mask_init, "logit_init": self.logit_init}

    # -- construction ----------------------------------------------------------------------------
    @torch.no_grad()
    def _set_integers(self, integers: Tensor, scale: float) -> None:
        self.pos = nn.Parameter(scale * (2 * to_planes(integers.clamp(min=0), self.n_max) - 1))
        self.neg = nn.Parameter(scale * (2 * to_planes((-integers).clamp(min=0), self.n_max) - 1))

    @torch.no_grad()
    def init_from(self, weight: Tensor) -> None:
        """Round-to-nearest ``n_max``-bit planes with logits ``+-logit_init``, and a step that makes the relaxed
        weight equal that round-to-nearest weight (``max|W| / (2^n - 1)``) at the current temperature: with
        every bit relaxed to ``sigmoid(beta m) * tanh(beta logit_init / 2)``, the step is divided by it."""
        levels = 2**self.n_max - 1
        step = weight.detach().abs().max().float().clamp(min=1e-8) / levels
        self._set_integers(torch.round(weight.detach().float() / step).clamp(-levels, levels), self.logit_init)
        gain = torch.sigmoid(self.beta * self.mask_init) * torch.tanh(self.beta * self.logit_init / 2)
        self.step = nn.Parameter((step / gain).reshape(1).clone())

    # -- the weight -------------------------------------------------------------------------------
    def selection(self, hard: bool = False) -> Tensor:
        if hard or bool(self.hard_mask) or bool(self.hard):
            return self.active().float()
        return torch.sigmoid(self.beta * self.mask)

    def integer_value(self, hard: bool = False) -> Tensor:
        """``sum_b M_b (B+_b - B-_b) 2^b``: relaxed, or exact integers once hardened (or ``hard``)."""
        hard = hard or bool(self.hard)
        if hard:
            pos, neg = (self.pos.detach() > 0).float(), (self.neg.detach() > 0).float()
        else:
            pos, neg = torch.sigmoid(self.beta * self.pos), torch.sigmoid(self.beta * self.neg)
        weights = self.selection(hard) * 2.0 ** torch.arange(self.n_max, device=pos.device)
        return torch.tensordot(weights, pos - neg, dims=1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.ready:
            self.init_from(x)
        if self.observing:
            return x
        step = grad_scale(self.step, 1.0 / (2**self.n_max - 1) ** 2)
        return (step * self.integer_value()).to(x.dtype)

    @torch.no_grad()
    def harden_(self) -> None:
        """From now on the exact quantized weight (step functions of the logits, hard selection)."""
        self.hard.fill_(True)

    @torch.no_grad()
    def max_relaxation_gap(self) -> float:
        """``max |sigmoid(beta p) - 1[p > 0]|`` over all bit logits: how far from exact the soft weight is."""
        gaps = [(torch.sigmoid(self.beta * t) - (t > 0).float()).abs().max() for t in (self.pos, self.neg)]
        return float(max(gaps))

    # -- packing -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: Tensor) -> Encoded:
        if not self.ready:
            self.init_from(x)
        integers = self.integer_value(hard=True)
        low, _ = self._span()  # codes of the selected span only: the unselected low bits are always zero
        codes = torch.div(integers, 2**low, rounding_mode="trunc").to(torch.int32)
        step = self.step.detach() * 2**low
        return Encoded(codes, {"step": step.clone()}, self.code_bits, -self.levels)

    @torch.no_grad()
    def restore(self, decoded: Tensor, enc: Encoded | None = None) -> None:
        """Exact logits from the decoded weight; the selection keeps the positions the checkpoint had."""
        integers = torch.round(decoded / self.step)
        self._set_integers(integers, HARD_LOGIT)
        self.hard.fill_(True)
