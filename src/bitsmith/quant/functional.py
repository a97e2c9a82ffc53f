"""Functional building blocks of fake quantization: STE rounding, gradient scaling, integer ranges."""

from __future__ import annotations

import torch
from torch import Tensor


class _RoundSTE(torch.autograd.Function):
    """round() in the forward pass, identity gradient in the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def round_ste(x: Tensor) -> Tensor:
    """Round half to even; the gradient passes straight through."""
    return _RoundSTE.apply(x)


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Identity in value (bit-exact), gradient multiplied by ``scale`` (LSQ's step-size scaling)."""
    return _GradScale.apply(x, scale)


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range of a ``bits``-wide uniform quantizer.

    Signed: [-2^(b-1), 2^(b-1)-1]; unsigned: [0, 2^b-1]. One signed bit is the binary (sign)
    quantizer {-1, +1}, handled by the caller.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be between 1 and 16, got {bits}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``scale * (clamp(round(x/scale) + z, qmin, qmax) - z)`` with a clipped straight-through gradient.

    The gradient w.r.t. ``x`` is 1 inside the clipping range and 0 outside; w.r.t. ``scale`` it is
    LSQ's ``round(x/s) - x/s`` inside and ``qmin - z`` / ``qmax - z`` outside.
    """
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def fake_quant_float_zero(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``fake_quant`` for a float zero point: the codes are ``round(x/scale + z)`` (the grid ``lo + scale * k``);
    with an integer ``z`` this differs from ``fake_quant`` only at exact ties."""
    q = torch.clamp(round_ste(x / scale + zero_point), qmin, qmax)
    return (q - zero_point) * scale


def quantize_codes_float_zero(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes of ``fake_quant_float_zero``."""
    return torch.clamp(torch.round(x / scale + zero_point), qmin, qmax).to(torch.int32)


def quantize_codes(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes in [qmin, qmax] (int32) of ``x``: the same arithmetic as ``fake_quant``."""
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return q.to(torch.int32)


def dequantize_codes(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Float values of integer codes: bit-identical to ``fake_quant`` of the encoded tensor."""
    return (codes.to(scale.dtype) - zero_point) * scale


class _SignSTE(torch.autograd.Function):
    """sign() with sign(0) = +1; gradient passes where |x| <= 1 (clipped STE)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def fake_binary(x: Tensor, scale: Tensor) -> Tensor:
    """One-bit (binary) quantizer ``scale * sign(x)``, values {-scale, +scale}."""
    return _SignSTE.apply(x / scale) * scale


def params_from_range(
    lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool, eps: float = 1e-8, float_zero: bool = False
) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map the range [lo, hi] onto the integer range [qmin, qmax].

    Symmetric: ``scale = max(|lo|, |hi|) / qmax``, zero point 0. Affine: the range is widened to
    contain 0 (so that 0 is exactly representable), ``scale = (hi - lo) / (qmax - qmin)`` and
    ``z = round(qmin - lo / scale)``. ``float_zero`` (min-offset grids, as llama.cpp's Q4_1 or HQQ): the
    range is not widened and ``z = qmin - lo / scale`` is not rounded, so the grid is ``lo + scale * k``.
    """
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = torch.clamp(amax / qmax, min=eps)
        return scale, torch.zeros_like(scale)
    if float_zero:
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
        return scale, qmin - lo / scale
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point
