"""MoBiQuant's any-precision weights: one code of ``slices x slice_bits`` bits per weight, readable at any
number of slices by dropping least-significant bits (spec ``shared/methods/mobiquant.md``, "MoBiSlice").

Per group of ``group_size`` inputs the full code ``c`` (``2^(slices * slice_bits)`` levels) sits on the grid
``lo + step * c``. Reading ``k`` slices keeps ``c >> r`` (``r = (slices - k) * slice_bits``) and decodes it at
the middle of the ``2^r`` fine codes it covers: ``lo + step * ((c >> r) * 2^r + (2^r - 1) / 2)``. So fewer
slices is exactly "drop the LSBs", each coarser reading is a uniform quantizer with step ``step * 2^r`` whose
error is zero-mean and below half its step, and every extra slice refines the previous reading. Slice 1 alone is
the 2-bit affine quantizer; slice ``e`` adds the residual at a step ``2^slice_bits`` times finer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bitsmith.quant.base import QUANTIZERS, Encoded, Quantizer

MAX_CODE_BITS = 16


def slice_reading(codes: Tensor, kept: int, total: int, slice_bits: int) -> Tensor:
    """The fine-grid position (float) that ``kept`` of ``total`` slices of the full ``codes`` decode to."""
    if not 1 <= kept <= total:
        raise ValueError(f"slices: {kept} slices requested; this model stores {total}: use 1..{total}")
    r = (total - kept) * slice_bits
    return (torch.div(codes, 2**r, rounding_mode="floor") * 2**r + (2**r - 1) / 2).to(torch.float32)


@QUANTIZERS.register("slices")
class SliceQuantizer(Quantizer):
    """Weights as ``slices`` residual slices of ``slice_bits`` bits per group; ``active`` slices are read."""

    kind = "slices"

    def __init__(self, slices: int = 4, slice_bits: int = 2, group_size: int = 128, active: int | None = None) -> None:
        super().__init__()
        if slices < 1 or slice_bits < 1 or slices * slice_bits > MAX_CODE_BITS:
            raise ValueError(f"slices: {slices} x {slice_bits} bits; need 1 <= slices * slice_bits <= {MAX_CODE_BITS}")
        self.slices, self.slice_bits, self.group_size = slices, slice_bits, group_size
        self.active = slices if active is None else active
        slice_reading(torch.zeros(1), self.active, slices, slice_bits)  # validates active
        self.register_buffer("lo", torch.empty(0))  # (groups,) lower end of each group's grid
        self.register_buffer("step", torch.empty(0))  # (groups,) the finest step

    @property
    def bits(self) -> int:
        return self.active * self.slice_bits

    @property
    def code_bits(self) -> int:
        return self.slices * self.slice_bits

    @property
    def levels(self) -> int:
        return 2**self.code_bits

    @property
    def ready(self) -> bool:
        return self.lo.numel() > 0

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "slices": self.slices, "slice_bits": self.slice_bits,
                "group_size": self.group_size, "active": self.active}  # fmt: skip

    def overhead_bits(self) -> int:
        return 8 * sum(t.numel() * t.element_size() for t in (self.lo, self.step))  # lo and step, as stored

    def grouped(self, weight: Tensor) -> Tensor:
        """``weight`` (``out x in``) as ``(out * in / group_size, group_size)``."""
        if weight.dim() != 2 or weight.shape[1] % self.group_size:
            raise ValueError(f"slices: group size {self.group_size} does not divide the {weight.shape[1]} inputs "
                             f"of a {tuple(weight.shape)} weight; pick a divisor")  # fmt: skip
        return weight.reshape(-1, self.group_size)

    @torch.no_grad()
    def set_range(self, weight: Tensor, low: Tensor | None = None, high: Tensor | None = None) -> None:
        """Each group's grid from ``[low, high]`` (default: its min and max)."""
        groups = self.grouped(weight.detach().float())
        low = groups.amin(1) if low is None else low
        high = groups.amax(1) if high is None else high
        self.lo = low.clone()
        self.step = ((high - low) / (self.levels - 1)).clamp(min=1e-12)

    def codes(self, weight: Tensor) -> Tensor:
        """The full codes (``groups x group_size``, int64) of ``weight``."""
        groups = self.grouped(weight.detach().float())
        return torch.clamp(torch.round((groups - self.lo[:, None]) / self.step[:, None]), 0, self.levels - 1).long()

    def read(self, weight: Tensor, kept: int) -> Tensor:
        """``weight`` quantized and read at ``kept`` slices (no gradient)."""
        position = slice_reading(self.codes(weight), kept, self.slices, self.slice_bits)
        return (self.lo[:, None] + self.step[:, None] * position).reshape(weight.shape).to(weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.set_range(x)
            return x
        if not self.ready:
            raise RuntimeError("slices quantizer has no grid: run the mobiquant method's calibration first")
        return self.read(x, self.active) + (x - x.detach())

    @torch.no_grad()
    def encode(self, x: Tensor) -> Encoded:
        codes = self.codes(x).reshape(x.shape).to(torch.int32)
        return Encoded(codes, {"lo": self.lo.clone(), "step": self.step.clone()}, self.code_bits, 0)

    @torch.no_grad()
    def decode(self, enc: Encoded) -> Tensor:
        """All slices (the full code): a reloaded model reads ``active`` of them in its forward."""
        lo, step = enc.params["lo"], enc.params["step"]
        groups = enc.codes.reshape(-1, self.group_size).float()
        if groups.shape[0] != lo.numel():
            raise ValueError(f"slices: {groups.shape[0]} groups of codes but {lo.numel()} group parameters")
        return (lo[:, None] + step[:, None] * groups).reshape(enc.codes.shape)
