"""AdaRound (Nagel et al., 2020): learn whether each weight rounds down or up.

``W_q = s * (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z)`` with the rectified sigmoid
``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (zeta 1.1, gamma -0.1), ``V`` initialised so that
``h(V)`` equals the fractional part of ``W / s`` (the soft weight starts at the float weight), and the
regulariser ``sum(1 - |2 h(V) - 1|^beta)`` pushing every ``h`` to 0 or 1 as ``beta`` anneals. The scale and zero
point are a calibrated ``UniformQuantizer``'s (per output channel or per tensor); they are not learned.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bitsmith.quant.split import SplitQuantizer
from bitsmith.quant.uniform import UniformQuantizer

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def rounding_regularizer(v: Tensor, beta: float) -> Tensor:
    """``sum(1 - |2 h(V) - 1|^beta)``: zero when every weight has decided to round down or up."""
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


class AdaRound(nn.Module):
    """A weight quantizer with learnable rounding, wrapping a calibrated per-channel / per-tensor uniform one."""

    def __init__(self, base: UniformQuantizer, weight: Tensor) -> None:
        super().__init__()
        if base.granularity not in ("channel", "tensor") or base.dynamic or not base.ready or base.binary:
            raise ValueError(
                f"AdaRound rounds a calibrated per-channel or per-tensor uniform weight quantizer, not "
                f"granularity {base.granularity!r}{' (dynamic)' if base.dynamic else ''}"
            )
        self.base = base
        self.hard = False
        scaled = weight.detach() / self._broadcast(base.scale, weight)
        rest = (scaled - scaled.floor()).clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    @staticmethod
    def _broadcast(param: Tensor, weight: Tensor) -> Tensor:
        return param.reshape(-1, *([1] * (weight.dim() - 1))) if param.numel() > 1 else param.reshape(())

    def rounding(self) -> Tensor:
        """``h(V)`` while learning; the hard decision (``h >= 0.5``) once ``hard`` is set."""
        return (self.alpha >= 0).to(self.alpha.dtype) if self.hard else rectified_sigmoid(self.alpha)

    def forward(self, weight: Tensor) -> Tensor:
        scale = self._broadcast(self.base.scale, weight)
        zero = self._broadcast(self.base.zero_point, weight)
        q = torch.clamp(torch.floor(weight.detach() / scale) + self.rounding() + zero, self.base.qmin, self.base.qmax)
        return (q - zero) * scale

    def alphas(self) -> list[nn.Parameter]:
        return [self.alpha]

    def set_hard(self, hard: bool) -> None:
        self.hard = hard

    @torch.no_grad()
    def rounded_weight(self, weight: Tensor) -> Tensor:
        """The hard-rounded weight, on the base quantizer's grid (quantizing it again with the base returns it)."""
        hard, self.hard = self.hard, True
        try:
            return self.forward(weight)
        finally:
            self.hard = hard


class SplitAdaRound(nn.Module):
    """AdaRound for a ``SplitQuantizer``'s weight: each part of the input channels rounds on its own grid."""

    def __init__(self, base: SplitQuantizer, weight: Tensor) -> None:
        super().__init__()
        self.base = base
        first, second = base._parts(weight)
        if not isinstance(base.first, UniformQuantizer) or not isinstance(base.second, UniformQuantizer):
            raise ValueError("AdaRound rounds the parts of a split of uniform quantizers")
        self.parts = nn.ModuleList([AdaRound(base.first, first), AdaRound(base.second, second)])

    def alphas(self) -> list[nn.Parameter]:
        return [part.alpha for part in self.parts]  # type: ignore[misc]

    def set_hard(self, hard: bool) -> None:
        for part in self.parts:
            part.hard = hard  # type: ignore[assignment]

    def forward(self, weight: Tensor) -> Tensor:
        first, second = self.base._parts(weight)
        return torch.cat([self.parts[0](first), self.parts[1](second)], self.base.dim)

    @torch.no_grad()
    def rounded_weight(self, weight: Tensor) -> Tensor:
        first, second = self.base._parts(weight)
        return torch.cat([self.parts[0].rounded_weight(first), self.parts[1].rounded_weight(second)], self.base.dim)


def rounding_for(quantizer: object, weight: Tensor) -> AdaRound | SplitAdaRound | None:
    """The learnable rounding of a weight quantizer AdaRound can round (uniform, or a split of uniform ones)."""
    if isinstance(quantizer, UniformQuantizer):
        return AdaRound(quantizer, weight)
    if isinstance(quantizer, SplitQuantizer):
        return SplitAdaRound(quantizer, weight)
    return None


def learnable_steps(quantizer: object) -> list[Tensor]:
    """The step sizes of a calibrated static activation quantizer (uniform, or both parts of a split one)."""
    if isinstance(quantizer, SplitQuantizer):
        return learnable_steps(quantizer.first) + learnable_steps(quantizer.second)
    if isinstance(quantizer, UniformQuantizer) and quantizer.ready and not quantizer.dynamic:
        return [quantizer.scale]
    return []
