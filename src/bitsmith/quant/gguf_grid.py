"""llama.cpp's GGUF block grids as constraints on a uniform quantizer's group parameters (``ggml-quants.c``), so that
a quantizer optimises the weights exactly as the file will store them.

* ``q8_0`` / ``q4_0``: symmetric 8 / 4 bits, groups of 32, the scale ``d`` in fp16.
* ``q4_1``: asymmetric 4 bits, groups of 32, ``x = d q + m``: ``d`` and the minimum ``m`` in fp16.
* ``q5_0`` / ``q5_1``: as ``q4_0`` / ``q4_1`` with 5 bits.
* ``q4_k``: asymmetric 4 bits, groups of 32 in super-blocks of 256: ``x = d sc_j q - dmin m_j`` with 6-bit
  ``sc_j``, ``m_j`` (0..63) per group and fp16 ``d``, ``dmin`` per super-block; the minimum is at most 0.
* ``q6_k``: symmetric 6 bits, groups of 16 in super-blocks of 256: ``x = d sc_j q`` with int8 ``sc_j``, fp16 ``d``.

``grid_params`` turns each group's min-max range into parameters on the grid: fp16-rounded scales (and minimums;
for ``q4_0`` / ``q5_0`` llama.cpp's signed scale ``max / -8`` (``-16``), which puts the group's largest weight
on the code ``-8`` and so uses all 16 (32) levels, where ``max|x| / 7`` would leave ``-8`` unused),
or for the K-quants the group scales quantized against their super-block's scale, the largest group taking the
top level (63 or 127) so that the packer reads ``d`` back exactly (``super_scales``). Deviation from llama.cpp's
own K-quantizer (``make_qkx2_quants``): the group scale and minimum come from the min-max range (and, in GPTQ /
AWQ, from their own searches), not from llama.cpp's weighted scale search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from bitsmith.quant.functional import params_from_range

GgufGridName = Literal["q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "q4_k", "q6_k"]  # a method's `grid:` field
SIGNED_SCALE = ("q4_0", "q5_0")  # grids whose scale carries the sign of the group's largest weight (all 2^b levels)
FP16_TINY = 2.0**-24  # the smallest positive fp16 (subnormal): a scale never rounds to 0


@dataclass(frozen=True)
class GgufGrid:
    name: str
    bits: int
    symmetric: bool
    group: int  # weights per scale
    super_block: int = 0  # K-quants: weights whose group scales share one fp16 scale
    levels: int = 0  # K-quants: the top integer level of a group's scale (and minimum)

    @property
    def per_super(self) -> int:
        return self.super_block // self.group if self.super_block else 1

    @property
    def bits_per_weight(self) -> float:
        """The file's bits per weight, scales included (llama.cpp's block sizes)."""
        return {"q8_0": 8.5, "q5_0": 5.5, "q5_1": 6.0, "q4_0": 4.5, "q4_1": 5.0, "q4_k": 4.5, "q6_k": 6.5625}[self.name]


GRIDS = {
    grid.name: grid
    for grid in (
        GgufGrid("q8_0", 8, True, 32),
        GgufGrid("q5_0", 5, True, 32),
        GgufGrid("q5_1", 5, False, 32),
        GgufGrid("q4_0", 4, True, 32),
        GgufGrid("q4_1", 4, False, 32),
        GgufGrid("q4_k", 4, False, 32, 256, 63),
        GgufGrid("q6_k", 6, True, 16, 256, 127),
    )
}


def get_grid(name: str) -> GgufGrid:
    if name not in GRIDS:
        raise ValueError(f"unknown GGUF grid {name!r}; choose one of {', '.join(GRIDS)}")
    return GRIDS[name]


def fp16(x: Tensor) -> Tensor:
    return x.to(torch.float16).float()


def check_width(grid: GgufGrid, name: str, inputs: int) -> None:
    """A layer whose inputs do not split into the grid's (super-)blocks is refused with the grids that fit."""
    width = grid.super_block or grid.group
    if inputs % width:
        fits = [g.name for g in GRIDS.values() if inputs % (g.super_block or g.group) == 0]
        raise ValueError(f"grid {grid.name}: layer {name!r} has {inputs} inputs, not a multiple of {width}; grids "
                         f"that fit it: {', '.join(fits) or 'none'} (llama.cpp itself falls back to another type "
                         "for such tensors; give this layer another grid or exclude it)")  # fmt: skip


def _levels(values: Tensor, levels: int, lowest: int) -> tuple[Tensor, Tensor]:
    """``values`` (``supers, per``, non-negative) as ``unit * k`` with fp16 ``unit`` per super-block and integer
    ``k`` in ``lowest..levels``, the largest value taking ``levels`` exactly; returns (``unit``, ``k``)."""
    top = values.amax(-1, keepdim=True)
    unit = fp16(top / levels)
    k = torch.where(unit > 0, torch.round(values / unit.clamp(min=FP16_TINY)), torch.zeros_like(values))
    k = k.clamp(lowest, levels)
    k.scatter_(-1, values.argmax(-1, keepdim=True), float(levels))
    return unit, k


def grid_params(grid: GgufGrid, lo: Tensor, hi: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """Scale and (float) zero point per group on ``grid`` from each group's range ``[lo, hi]`` (flat, groups of a
    row consecutive: a K-quant super-block is ``per_super`` consecutive groups); codes ``x / s + z``."""
    if grid.symmetric and grid.name in SIGNED_SCALE:  # llama.cpp: d = max / -8 (-16), max the largest |x| signed
        signed = torch.where(lo.abs() > hi.abs(), lo, hi)
        scale = fp16(signed / qmin)
        scale = torch.where(scale.abs() < FP16_TINY, torch.full_like(scale, FP16_TINY), scale)
        return scale, torch.zeros_like(scale)
    if grid.symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
        if grid.super_block:
            unit, k = _levels(scale.reshape(-1, grid.per_super), grid.levels, 1)
            scale = (unit.clamp(min=FP16_TINY) * k).reshape(-1)
        else:
            scale = fp16(scale).clamp(min=FP16_TINY)
        return scale, torch.zeros_like(scale)
    if grid.super_block:  # x = s q - mn with mn >= 0: the range always reaches down to 0 or below
        lo = lo.clamp(max=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-12)
    minimum = -lo  # the offset subtracted from s q
    if grid.super_block:
        unit, k = _levels(scale.reshape(-1, grid.per_super), grid.levels, 1)
        scale = (unit.clamp(min=FP16_TINY) * k).reshape(-1)
        munit, mk = _levels(minimum.reshape(-1, grid.per_super), grid.levels, 0)
        minimum = (munit * mk).reshape(-1)
    else:
        scale = fp16(scale).clamp(min=FP16_TINY)
        minimum = fp16(minimum)
    return scale, qmin + minimum / scale


def range_params(
    grid: GgufGrid | None, lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool, float_zero: bool = False
) -> tuple[Tensor, Tensor]:
    """Scale and zero point of each range ``[lo, hi]``: on ``grid`` when there is one (``grid_params``), else
    ``functional.params_from_range``'s plain ones."""
    if grid is not None:
        return grid_params(grid, lo, hi, qmin, qmax)
    return params_from_range(lo, hi, qmin, qmax, symmetric, float_zero=float_zero)


def super_scales(grid: GgufGrid, values: Tensor) -> tuple[Tensor, Tensor]:
    """(``unit`` per super-block, integer level per group) of K-quant group values that ``grid_params`` produced:
    the largest group holds the top level, so ``unit = max / levels`` (fp16-rounded against float error)."""
    values = values.reshape(-1, grid.per_super)
    unit = fp16(values.amax(-1, keepdim=True) / grid.levels)
    k = torch.where(unit > 0, torch.round(values / unit.clamp(min=FP16_TINY)), torch.zeros_like(values))
    return unit, k.clamp(0, grid.levels)
