"""Split quantization (Q-Diffusion's "split shortcut"): a tensor made by concatenating two parts along ``dim``
(a U-Net decoder's upsampled features and its skip connection) is quantized part by part, each part with its own
quantizer, because the two parts' ranges differ (the concatenation is bimodal). Used for a layer's input (split
along the channels) and for its weight (split along the input channels, the same index)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bitsmith.quant.base import QUANTIZERS, Encoded, Quantizer, build_quantizer


@QUANTIZERS.register("split")
class SplitQuantizer(Quantizer):
    """``cat(first(x[..:split..]), second(x[..split:..]))`` along ``dim``."""

    kind = "split"

    def __init__(self, first: Quantizer | dict[str, Any], second: Quantizer | dict[str, Any], split: int,
                 dim: int = 1) -> None:  # fmt: skip
        super().__init__()
        self.first = first if isinstance(first, Quantizer) else build_quantizer(first)
        self.second = second if isinstance(second, Quantizer) else build_quantizer(second)
        if split < 1:
            raise ValueError(f"split {split}: the first part needs at least one channel")
        if self.first.bits != self.second.bits:
            raise ValueError(f"split parts quantize at one width; got {self.first.bits} and {self.second.bits} bits")
        self.split, self.dim = int(split), int(dim)

    def _parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[self.dim] <= self.split:
            raise ValueError(f"a tensor of {x.shape[self.dim]} channels on dim {self.dim} cannot split at {self.split}")
        return x.narrow(self.dim, 0, self.split), x.narrow(self.dim, self.split, x.shape[self.dim] - self.split)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self._parts(x)
        return torch.cat([self.first(a), self.second(b)], self.dim)

    @property
    def bits(self) -> int:
        return self.first.bits

    @property
    def code_bits(self) -> int:
        return max(self.first.code_bits, self.second.code_bits)

    @property
    def ready(self) -> bool:
        return self.first.ready and self.second.ready

    def overhead_bits(self) -> int:
        return self.first.overhead_bits() + self.second.overhead_bits()

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "first": self.first.config(), "second": self.second.config(), "split": self.split,
                "dim": self.dim}  # fmt: skip

    def start_observing(self) -> None:
        super().start_observing()
        self.first.start_observing()
        self.second.start_observing()

    def stop_observing(self) -> None:
        super().stop_observing()
        self.first.stop_observing()
        self.second.stop_observing()

    def encode(self, x: Tensor) -> Encoded:
        a, b = self._parts(x)
        first, second = self.first.encode(a), self.second.encode(b)
        if first.code_min != second.code_min:
            raise ValueError("split parts encode to different code ranges; quantize both the same way")
        params = {**{f"first.{k}": v for k, v in first.params.items()},
                  **{f"second.{k}": v for k, v in second.params.items()}}  # fmt: skip
        return Encoded(torch.cat([first.codes, second.codes], self.dim), params, self.code_bits, first.code_min)

    def decode(self, enc: Encoded) -> Tensor:
        codes = enc.codes
        parts = []
        for name, quantizer, piece in (("first", self.first, codes.narrow(self.dim, 0, self.split)),
                                       ("second", self.second, codes.narrow(self.dim, self.split,
                                                                            codes.shape[self.dim] - self.split))):  # fmt: skip
            params = {k.split(".", 1)[1]: v for k, v in enc.params.items() if k.startswith(f"{name}.")}
            parts.append(quantizer.decode(Encoded(piece, params, quantizer.code_bits, enc.code_min)))
        return torch.cat(parts, self.dim)
