"""NoisyBias: a fixed per-channel noise ``N`` added before any activation quantizer and removed after.

``y = W (Q(x + N) - N) + b`` in simulation; after ``fold_into`` the layer holds ``b - W N`` as its bias
and the quantizer computes ``Q(x + N)`` only, so deployment costs one add before the quantize step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bitsmith.quant.base import QUANTIZERS, Encoded, Quantizer, WrappedQuantizer, build_quantizer


@QUANTIZERS.register("noisy")
class NoisyBias(WrappedQuantizer):
    """Wraps ``inner``: ``inner(x + noise) - noise`` (``inner(x + noise)`` once folded into a bias)."""

    kind = "noisy"

    def __init__(self, inner: Quantizer | dict[str, Any], channels: int, folded: bool = False) -> None:
        super().__init__()
        self.inner = build_quantizer(inner) if isinstance(inner, dict) else inner
        if self.inner is None:
            raise ValueError("NoisyBias needs an inner quantizer")
        self.channels, self.folded = channels, folded
        self.register_buffer("noise", torch.zeros(channels))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "inner": self.inner.config(), "channels": self.channels, "folded": self.folded}

    def overhead_bits(self) -> int:
        return self.inner.overhead_bits() + 32 * self.channels

    def start_observing(self) -> None:
        super().start_observing()
        self.inner.start_observing()

    def stop_observing(self) -> None:
        super().stop_observing()
        self.inner.stop_observing()

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            return self.inner(x)
        noise = self.noise.to(x.dtype)
        out = self.inner(x + noise)
        return out if self.folded else out - noise

    def encode(self, x: Tensor) -> Encoded:
        return self.inner.encode(x + self.noise.to(x.dtype))

    def decode(self, enc: Encoded) -> Tensor:
        out = self.inner.decode(enc)
        return out if self.folded else out - self.noise.to(out.dtype)

    @torch.no_grad()
    def fold_into(self, layer: Any) -> bool:
        """Fold ``-W N`` into ``layer``'s bias (``W`` its effective weight); False when it has no bias."""
        if self.folded or layer.bias is None:
            return False
        layer.bias.sub_(layer.effective_weight() @ self.noise.to(layer.bias))
        self.folded = True
        return True

    def float_bias(self, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        if not self.folded or bias is None:
            return bias
        return bias + weight @ self.noise.to(bias)
