"""Round-clamp quantizer (MSQ): sign-magnitude codes of a float weight, with its least significant bit
available to autograd.

``Q(w) = sign(w) * clamp(round(|w| / step), 0, 2^n - 1) * step``. Its gradient (``gradient``) is
``clipped`` (MSQ: ``sign(w) * d|w|/dw`` inside the range, zero beyond it, so clipped weights do not drift)
or ``identity`` (BSQ's fixed-scheme fine-tune: passed straight through, zero codes included); the
float weight is the only trainable tensor, ``step`` a buffer set from ``max|W|`` at initialisation. ``lsb(w)`` is the magnitude code's LSB as
``|k - 2 round(k / 2)|`` with the gradient through ``k`` only, so its L1 pushes each code to the
nearest even value. ``drop_lsb_`` doubles the step (lossless when every code is even), ``drop_msb_``
lowers the top when no code uses it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from bitsmith.quant.base import QUANTIZERS, Encoded
from bitsmith.quant.bitplane import SignMagnitude


@QUANTIZERS.register("roundclamp")
class RoundClampQuantizer(SignMagnitude):
    """``n``-bit sign-magnitude weight quantizer with a fixed per-layer LSB ``step``."""

    kind = "roundclamp"

    def __init__(self, bits: int = 8, gradient: Literal["clipped", "identity"] = "clipped") -> None:
        super().__init__()
        if not 1 <= bits <= 16:
            raise ValueError(f"round-clamp bits must be between 1 and 16, got {bits}")
        if gradient not in ("clipped", "identity"):
            raise ValueError(f"round-clamp gradient must be 'clipped' or 'identity', got {gradient!r}")
        self.gradient = gradient
        self.register_buffer("nbits", torch.tensor(bits))  # in the state dict: precision survives a resume
        self.register_buffer("step", torch.empty(0))

    @property
    def bits(self) -> int:
        return int(self.nbits)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "gradient": self.gradient}

    @torch.no_grad()
    def init_from(self, weight: Tensor) -> None:
        self.step = (weight.detach().abs().max().float().clamp(min=1e-8) / self.levels).reshape(1)

    def codes(self, weight: Tensor) -> Tensor:
        """Magnitude codes ``k`` (exact integers forward, clipped straight-through backward)."""
        scaled = weight.abs() / self.step
        hard = torch.round(scaled.detach()).clamp(0, self.levels)
        inside = (scaled.detach() <= self.levels).to(scaled.dtype)
        return hard + (scaled - scaled.detach()) * inside

    def lsb(self, weight: Tensor) -> Tensor:
        """The least significant bit of every magnitude code, differentiable through the code."""
        k = self.codes(weight)
        return (k - 2 * torch.round(k.detach() / 2)).abs()

    def forward(self, x: Tensor) -> Tensor:
        if not self.ready:
            self.init_from(x)
        if self.observing:
            return x
        if self.gradient == "identity":
            return self.integers(x) * self.step + (x - x.detach())  # exact codes, identity gradient
        return (torch.sign(x.detach()) * self.codes(x) * self.step).to(x.dtype)

    @torch.no_grad()
    def integers(self, weight: Tensor) -> Tensor:
        return torch.sign(weight) * torch.round(weight.abs() / self.step).clamp(0, self.levels)

    @torch.no_grad()
    def drop_lsb_(self) -> None:
        self.step.mul_(2)
        self.nbits.sub_(1)

    @torch.no_grad()
    def drop_msb_(self) -> None:
        self.nbits.sub_(1)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Encoded:
        if not self.ready:
            self.init_from(x)
        return Encoded(
            self.integers(x).to(torch.int32), {"step": self.step.detach().clone()}, self.code_bits, -self.levels
        )
