"""Uniform (affine or symmetric) quantizer: per tensor, channel, group or token; calibrated, fixed or LSQ step."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith import distributed
from bitsmith.data import drop_padding
from bitsmith.quant.base import QUANTIZERS, Encoded, Quantizer
from bitsmith.quant.functional import (
    dequantize_codes,
    fake_binary,
    fake_quant,
    fake_quant_float_zero,
    grad_scale,
    int_range,
    params_from_range,
    quantize_codes,
    quantize_codes_float_zero,
)
from bitsmith.quant.gguf_grid import get_grid, range_params
from bitsmith.quant.observers import OBSERVERS, Observer, build_observer

GRANULARITIES = ("tensor", "channel", "group", "token")
STEPS = ("calibrated", "learned", "fixed")
# field types for method dataclasses: recipes are validated against them
Bits = Annotated[int, Field(ge=1, le=16)]
Granularity = Literal["tensor", "channel", "group", "token"]
ObserverName = Literal["minmax", "ema", "percentile", "mse", "kl"]
GroupSize = Annotated[int, Field(ge=1)]


def storage_bits(bits: int) -> int:
    """Width of the smallest integer type holding a ``bits``-bit value (zero points are stored so)."""
    return 8 if bits <= 8 else 16 if bits <= 16 else 32


@QUANTIZERS.register("uniform")
class UniformQuantizer(Quantizer):
    """``Q(x) = s * (clamp(round(x/s) + z, qmin, qmax) - z)``.

    Args:
        bits: 1..16. One symmetric bit is the binary quantizer ``s * sign(x)``.
        symmetric: signed codes and zero point 0; otherwise unsigned codes with a zero point.
        granularity: ``tensor``; ``channel`` (along ``ch_axis``); ``group`` (``group_size`` consecutive
            elements of each output row, i.e. along the input dimension of a weight); ``token``
            (one scale per row of the last dimension, dynamic only).
        step: ``calibrated`` (range from an observer), ``learned`` (LSQ: trainable step with
            gradient scale ``1/sqrt(N * qmax)``), or ``fixed`` (the given ``scale``).
        observer: observer name for ``calibrated`` (minmax, ema, percentile, mse, kl) and its options.
        dynamic: compute the min-max range from every input at run time (activations).
        lsq_batch_dim: for ``learned`` activations: exclude dim 0 (the batch) from LSQ's ``N``.
        float_zero: asymmetric only: a float zero point (grid ``min + scale * k``, llama.cpp Q4_1 / HQQ style)
            instead of an integer one (which keeps 0 exactly representable); stored as 32 bits.
        grid: a llama.cpp GGUF block grid (``q8_0``, ``q4_0``, ``q4_1``, ``q4_k``, ``q6_k``;
            ``bitsmith.quant.gguf_grid``): every range is turned into parameters the GGUF type stores exactly
            (fp16 scales; K-quants: group scales quantized per super-block); it fixes bits, symmetry and groups.
    """

    kind = "uniform"

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = True,
        granularity: str = "tensor",
        ch_axis: int = 0,
        group_size: int | None = None,
        step: str = "calibrated",
        observer: str = "minmax",
        observer_args: dict[str, Any] | None = None,
        dynamic: bool = False,
        scale: float | None = None,
        lsq_batch_dim: bool = False,
        float_zero: bool = False,
        grid: str | None = None,
    ) -> None:
        super().__init__()
        self.grid = None if grid is None else get_grid(grid)
        if self.grid is not None:
            expected = (self.grid.bits, self.grid.symmetric, "group", self.grid.group, not self.grid.symmetric)
            if (bits, symmetric, granularity, group_size, float_zero) != expected or dynamic or step != "calibrated":
                raise ValueError(f"grid {grid}: needs bits {expected[0]}, symmetric {expected[1]}, groups of "
                                 f"{expected[3]}, float_zero {expected[4]}, a calibrated static step")  # fmt: skip
        int_range(bits, symmetric)  # validates bits
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if step not in STEPS:
            raise ValueError(f"step must be one of {STEPS}, got {step!r}")
        if granularity == "group" and (group_size is None or group_size < 1):
            raise ValueError("granularity 'group' needs a positive group_size, e.g. group_size=128")
        if granularity == "token" and not dynamic:
            raise ValueError("granularity 'token' is only defined for dynamic=True quantizers")
        if step == "fixed" and (scale is None or scale <= 0):
            raise ValueError("step 'fixed' needs a positive scale, e.g. scale=0.05")
        if observer not in OBSERVERS:
            raise ValueError(f"unknown observer {observer!r}; choose one of {OBSERVERS.names()}")
        self._bits, self.symmetric, self.granularity = bits, symmetric, granularity
        self.ch_axis, self.group_size, self.step = ch_axis, group_size, step
        self.observer_name, self.observer_args = observer, dict(observer_args or {})
        self.dynamic, self.fixed_scale, self.lsq_batch_dim = dynamic, scale, lsq_batch_dim
        if float_zero and symmetric:
            raise ValueError("float_zero is an asymmetric grid; set symmetric=False")
        self.float_zero = float_zero
        self.binary = bits == 1 and symmetric
        self.qmin, self.qmax = (-1, 1) if self.binary else int_range(bits, symmetric)
        empty = torch.empty(0)
        if step == "learned":
            self.scale = nn.Parameter(empty.clone())
        else:
            self.register_buffer("scale", empty.clone())
        self.register_buffer("zero_point", empty.clone())
        if step == "fixed":
            self.scale = torch.tensor([float(scale)])  # type: ignore[arg-type]
            self.zero_point = torch.zeros(1)
        self._observer: Observer | None = None

    # -- properties -------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self._bits

    @property
    def code_min(self) -> int:
        return 0 if self.binary else self.qmin

    @property
    def ready(self) -> bool:
        return self.dynamic or self.scale.numel() > 0

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "bits": self._bits, "symmetric": self.symmetric,
            "granularity": self.granularity, "ch_axis": self.ch_axis, "group_size": self.group_size,
            "step": self.step, "observer": self.observer_name, "observer_args": self.observer_args,
            "dynamic": self.dynamic, "scale": self.fixed_scale, "lsq_batch_dim": self.lsq_batch_dim,
            **({"float_zero": True} if self.float_zero else {}),
            **({"grid": self.grid.name} if self.grid else {}),
        }  # fmt: skip

    def overhead_bits(self) -> int:
        if self.dynamic:
            return 0
        if self.grid is not None:  # the GGUF type's own bytes: its bits per weight beyond the codes
            return round(self.scale.numel() * self.grid.group * (self.grid.bits_per_weight - self.grid.bits))
        zero_bits = 0 if self.symmetric else 32 if self.float_zero else storage_bits(self._bits)
        return self.scale.numel() * (32 + zero_bits)

    # -- layout: rows share one scale -----------------------------------------------------------
    def rows(self, x: Tensor) -> Tensor:
        """``x`` reshaped to ``(rows, elements)``; each row shares one scale."""
        if self.granularity == "tensor":
            return x.reshape(1, -1)
        if self.granularity == "channel":
            return x.movedim(self.ch_axis, 0).reshape(x.shape[self.ch_axis], -1)
        if self.granularity == "token":
            return x.reshape(-1, x.shape[-1])
        return self._grouped(x).reshape(-1, self.group_size)  # type: ignore[arg-type]

    def _grouped(self, x: Tensor) -> Tensor:
        """(out, in...) -> (out, groups, group_size)."""
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] % self.group_size:  # type: ignore[operator]
            raise ValueError(
                f"group_size {self.group_size} does not divide the {flat.shape[1]} input elements "
                f"of a tensor of shape {tuple(x.shape)}; choose a divisor or granularity='channel'"
            )
        return flat.reshape(x.shape[0], -1, self.group_size)  # type: ignore[arg-type]

    def _per_granularity(self, x: Tensor, params: tuple[Tensor, ...], op: Callable[..., Tensor]) -> Tensor:
        """Run ``op(x_view, *params_view)`` with params broadcast to their rows, in ``x``'s shape."""
        if self.granularity == "tensor":
            return op(x, *(p.reshape(()) for p in params))
        if self.granularity == "channel":
            shape = [1] * x.dim()
            shape[self.ch_axis] = -1
            return op(x, *(p.view(shape) for p in params))
        if self.granularity == "token":
            return op(x, *(p.view(*x.shape[:-1], 1) for p in params))
        grouped = self._grouped(x)
        return op(grouped, *(p.view(*grouped.shape[:2], 1) for p in params)).reshape(x.shape)

    # -- parameters -----------------------------------------------------------------------------
    def start_observing(self) -> None:
        super().start_observing()
        self._observer = build_observer(self.observer_name, **self.observer_args)

    def stop_observing(self) -> None:
        super().stop_observing()
        if self._observer is None or self.step == "fixed":
            return
        lo, hi = self._observer.compute(self.qmin, self.qmax, self.symmetric)
        self._observer = None
        self.set_range(lo, hi)

    @torch.no_grad()
    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        """Set scale and zero point from a clipping range per row (on the GGUF grid, when there is one)."""
        scale, zero_point = range_params(
            self.grid, lo.float(), hi.float(), self.qmin, self.qmax, self.symmetric, self.float_zero
        )
        if isinstance(self.scale, nn.Parameter):
            self.scale = nn.Parameter(scale)
        else:
            self.scale = scale
        self.zero_point = zero_point

    @torch.no_grad()
    def _lsq_init(self, x: Tensor) -> None:
        """LSQ initialisation ``s = 2 mean|x| / sqrt(qmax)`` per row."""
        scale = 2 * self.rows(x).abs().float().mean(dim=1) / math.sqrt(self.qmax)
        self.scale = nn.Parameter(torch.clamp(scale, min=1e-8))
        self.zero_point = torch.zeros_like(scale)

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.dynamic:
            rows = self.rows(x.detach()).float()
            lo, hi = rows.amin(1), rows.amax(1)
            if self.training and self.granularity in ("tensor", "channel"):  # a range over the batch: data-parallel
                lo, hi = distributed.batch_range(lo, hi)  # training takes it over every rank's slice
            return params_from_range(lo, hi, self.qmin, self.qmax, self.symmetric)
        if not self.ready:
            if self.step != "learned":
                raise RuntimeError(
                    "quantizer is not calibrated: run calibration data through the model "
                    "(bitsmith.compress(model, methods, calib_data)) or call calibrate_(tensor)"
                )
            self._lsq_init(x)
        scale = self.scale
        if self.step == "learned" and torch.is_grad_enabled():
            n = x[0].numel() if self.lsq_batch_dim else x.numel()
            scale = grad_scale(scale, 1.0 / math.sqrt(n / scale.numel() * self.qmax))
        return scale, self.zero_point

    # -- the quantizer ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.observing and self._observer is not None:
            self._observer.update(self.rows(drop_padding(x.detach())).float())
            return x
        scale, zero_point = self._params(x)
        if self.binary:
            out = self._per_granularity(x, (scale,), fake_binary)
        else:
            fake = fake_quant_float_zero if self.float_zero else fake_quant
            out = self._per_granularity(x, (scale, zero_point), lambda v, s, z: fake(v, s, z, self.qmin, self.qmax))
        return out.to(x.dtype)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Encoded:
        scale, zero_point = (p.detach() for p in self._params(x))
        if self.binary:
            codes = self._per_granularity(x, (scale,), lambda v, s: (v / s >= 0).to(torch.int32))
        else:
            quantize = quantize_codes_float_zero if self.float_zero else quantize_codes
            codes = self._per_granularity(
                x, (scale, zero_point), lambda v, s, z: quantize(v, s, z, self.qmin, self.qmax)
            )
        return Encoded(codes, {"scale": scale, "zero_point": zero_point}, self._bits, self.code_min)

    @torch.no_grad()
    def decode(self, enc: Encoded) -> Tensor:
        params = (enc.params["scale"], enc.params["zero_point"])
        if self.binary:
            return self._per_granularity(enc.codes, params[:1], lambda c, s: (2 * c.to(s.dtype) - 1) * s)
        return self._per_granularity(enc.codes, params, dequantize_codes)
