"""Bit-plane quantizer: a weight as ``step * sum_b 2^b (P_b - N_b)`` with trainable relaxed bits.

The common representation of BSQ, CSQ and MSQ. ``P`` and ``N`` hold the positive and negative parts
bit by bit (b = 0 is the least significant bit); during training they are real numbers (BSQ keeps
them in [0, 2]), and ``requantize_()`` hardens them to exact {0, 1} planes. The forward pass rounds
and clips the integer magnitude with a straight-through gradient, so it is always an exact
``bits``-bit sign-magnitude quantized weight.

Parameterisation note: we store the value of one least-significant bit, ``step = s / (2^n - 1)`` in
BSQ's notation, so that adding or removing bits is bit-exact (``step`` doubles when the LSB is
dropped). Its gradient is scaled by ``1/(2^n - 1)^2`` so that SGD on ``step`` moves the represented
weights exactly as SGD on BSQ's ``s`` does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.quant.base import QUANTIZERS, Encoded, Quantizer
from bitsmith.quant.functional import grad_scale


def to_planes(magnitude: Tensor, bits: int) -> Tensor:
    """Binary decomposition ``(bits, *shape)`` of non-negative integer-valued ``magnitude``."""
    m = magnitude.to(torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64).view(-1, *([1] * m.dim()))
    return ((m.unsqueeze(0) >> shifts) & 1).float()


class SignMagnitude(Quantizer):
    """Shared by the per-layer-step sign-magnitude quantizers: codes in ``[-(2^n - 1), 2^n - 1]``."""

    @property
    def code_bits(self) -> int:
        return self.bits + 1  # sign + magnitude

    @property
    def levels(self) -> int:
        """Largest integer magnitude, ``2^bits - 1``."""
        return 2**self.bits - 1

    @property
    def ready(self) -> bool:
        return self.step.numel() > 0

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "bits": self.bits}

    def overhead_bits(self) -> int:
        return 32  # the step

    @torch.no_grad()
    def decode(self, enc: Encoded) -> Tensor:
        return enc.params["step"] * enc.codes.to(torch.float32)


@QUANTIZERS.register("bitplane")
class BitPlaneQuantizer(SignMagnitude):
    """Weight quantizer that owns the weight as ``bits`` positive and negative bit planes.

    It is initialised from the float weight on its first call (or by ``calibrate_``); after that its
    input is ignored and the planes are the weight.
    """

    kind = "bitplane"
    packed_exclude = ("pos", "neg")

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        if not 1 <= bits <= 16:
            raise ValueError(f"bit-plane bits must be between 1 and 16, got {bits}")
        self._bits = bits
        self.pos = nn.Parameter(torch.empty(0))
        self.neg = nn.Parameter(torch.empty(0))
        self.step = nn.Parameter(torch.empty(0))

    @property
    def bits(self) -> int:
        return self._bits

    # -- construction and exact re-quantization ---------------------------------------------
    @torch.no_grad()
    def _set(self, integers: Tensor, step: Tensor, bits: int) -> None:
        """Set exact planes from signed integer magnitudes ``integers`` (|.| < 2^bits)."""
        self.pos = nn.Parameter(to_planes(integers.clamp(min=0), bits))
        self.neg = nn.Parameter(to_planes((-integers).clamp(min=0), bits))
        self.step = nn.Parameter(step.reshape(1).float().clone())
        self._bits = bits

    @torch.no_grad()
    def init_from(self, weight: Tensor) -> None:
        """Round-to-nearest ``bits``-bit conversion with ``step = max|W| / (2^bits - 1)``."""
        step = weight.detach().abs().max().float().clamp(min=1e-8) / self.levels
        integers = torch.round(weight.detach().float() / step).clamp(-self.levels, self.levels)
        self._set(integers, step, self.bits)

    def integer_value(self) -> Tensor:
        """Real-valued ``sum_b 2^b (P_b - N_b)`` (exact integers once planes are hardened)."""
        powers = (2.0 ** torch.arange(self.bits)).view(-1, *([1] * (self.pos.dim() - 1)))
        return ((self.pos - self.neg) * powers).sum(dim=0)

    def _integers(self) -> Tensor:
        value = self.integer_value().detach()
        return torch.round(value.clamp(-self.levels, self.levels))

    @torch.no_grad()
    def requantize_(self) -> None:
        """Harden the relaxed planes to exact {0, 1} planes of the current rounded weight."""
        self._set(self._integers(), self.step.detach(), self.bits)

    @torch.no_grad()
    def clamp_planes_(self, low: float = 0.0, high: float = 2.0) -> None:
        self.pos.clamp_(low, high)
        self.neg.clamp_(low, high)

    @torch.no_grad()
    def drop_lsb_(self) -> None:
        """Remove the least significant bit (after re-quantization); values change only if it was set."""
        integers = torch.div(self._integers(), 2, rounding_mode="trunc")
        self._set(integers, self.step.detach() * 2, self.bits - 1)

    @torch.no_grad()
    def drop_msb_(self) -> None:
        """Remove the most significant bit; magnitudes that used it saturate."""
        levels = 2 ** (self.bits - 1) - 1
        self._set(self._integers().clamp(-levels, levels), self.step.detach(), self.bits - 1)

    @torch.no_grad()
    def add_msb_(self) -> None:
        """One more bit on top; relaxed values that overflowed the old range keep up to the new one."""
        levels = 2 ** (self.bits + 1) - 1
        integers = torch.round(self.integer_value().detach().clamp(-levels, levels))
        self._set(integers, self.step.detach(), self.bits + 1)

    def plane_density(self) -> Tensor:
        """Fraction of weights whose rounded magnitude has bit b set, ``(bits,)`` (b = 0 is the LSB)."""
        return to_planes(self._integers().abs(), self.bits).flatten(1).mean(dim=1)

    # -- the quantizer -------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not self.ready:
            self.init_from(x)
        if self.observing:
            return x
        value = self.integer_value()
        hard = torch.round(value.detach().clamp(-self.levels, self.levels))
        unit = hard + (value - value.detach())  # exact integers forward, straight-through backward
        step = grad_scale(self.step, 1.0 / self.levels**2)
        return (step * unit).to(x.dtype)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Encoded:
        if not self.ready:
            self.init_from(x)
        codes = self._integers().to(torch.int32)
        return Encoded(codes, {"step": self.step.detach().clone()}, self.code_bits, -self.levels)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.pos.numel():  # planes may have been resized by a precision change: bits follow them
            self._bits = self.pos.shape[0]

    @torch.no_grad()
    def restore(self, decoded: Tensor, enc: Encoded | None = None) -> None:
        self._set(torch.round(decoded / self.step), self.step.detach(), self.bits)
