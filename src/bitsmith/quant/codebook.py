"""Codebook (non-uniform) quantizer: each value snaps to the nearest of a sorted set of levels."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.quant.base import QUANTIZERS, Encoded, Quantizer


def kmeans_1d(x: Tensor, k: int, iters: int = 50) -> Tensor:
    """Sorted 1-D k-means (Lloyd) centres of ``x``, initialised at the data's quantiles."""
    x = x.flatten().float()
    if x.numel() == 0:
        raise ValueError("k-means needs data; run calibration batches through the model first")
    q = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    centres = torch.quantile(x[: 1 << 24], q)
    for _ in range(iters):
        idx = nearest_level(x, centres)
        sums = torch.zeros(k).scatter_add_(0, idx, x)
        counts = torch.zeros(k).scatter_add_(0, idx, torch.ones_like(x))
        new = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        new, _ = torch.sort(new)
        if torch.allclose(new, centres):
            break
        centres = new
    return centres


def nearest_level(x: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest of the sorted ``levels`` for each element (ties go to the lower level)."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x, midpoints.to(x.dtype), right=False)


@QUANTIZERS.register("codebook")
class CodebookQuantizer(Quantizer):
    """Non-uniform quantizer with ``num_levels`` sorted levels, set explicitly or by k-means on data.

    The gradient w.r.t. the input is straight-through; with ``learn_levels`` the levels are trainable.
    """

    kind = "codebook"

    def __init__(
        self,
        num_levels: int = 16,
        levels: list[float] | None = None,
        learn_levels: bool = False,
        kmeans_iters: int = 50,
        max_samples: int = 1 << 18,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if levels is not None:
            num_levels = len(levels)
            if list(levels) != sorted(levels) or len(set(levels)) != len(levels):
                raise ValueError(f"codebook levels must be strictly increasing, got {levels}")
        if num_levels < 2:
            raise ValueError(f"a codebook needs at least 2 levels, got {num_levels}")
        self.num_levels, self.learn_levels = num_levels, learn_levels
        self.kmeans_iters, self.max_samples, self.seed = kmeans_iters, max_samples, seed
        self.initial_levels = None if levels is None else [float(v) for v in levels]
        init = torch.tensor(self.initial_levels) if levels is not None else torch.empty(0)
        if learn_levels:
            self.levels = nn.Parameter(init)
        else:
            self.register_buffer("levels", init)
        self._samples: list[Tensor] = []

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(self.num_levels)))

    @property
    def ready(self) -> bool:
        return self.levels.numel() == self.num_levels

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "num_levels": self.num_levels, "levels": self.initial_levels,
            "learn_levels": self.learn_levels, "kmeans_iters": self.kmeans_iters,
            "max_samples": self.max_samples, "seed": self.seed,
        }  # fmt: skip

    def overhead_bits(self) -> int:
        return 32 * self.num_levels

    def start_observing(self) -> None:
        super().start_observing()
        self._samples = []

    @torch.no_grad()
    def stop_observing(self) -> None:
        super().stop_observing()
        if not self._samples:
            return
        data = torch.cat(self._samples)
        self._samples = []
        centres = kmeans_1d(data, self.num_levels, self.kmeans_iters)
        self.levels = nn.Parameter(centres) if self.learn_levels else centres

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            flat = x.detach().flatten().float()
            if flat.numel() > self.max_samples:
                gen = torch.Generator().manual_seed(self.seed + len(self._samples))
                flat = flat[torch.randperm(flat.numel(), generator=gen)[: self.max_samples]]
            self._samples.append(flat)
            return x
        if not self.ready:
            raise RuntimeError("codebook quantizer has no levels: calibrate it (k-means) or pass levels=")
        idx = nearest_level(x.detach(), self.levels.detach())
        return (self.levels[idx] + (x - x.detach())).to(x.dtype)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Encoded:
        codes = nearest_level(x, self.levels).to(torch.int32)
        return Encoded(codes, {"levels": self.levels.detach().clone()}, self.bits, 0)

    @torch.no_grad()
    def decode(self, enc: Encoded) -> Tensor:
        return enc.params["levels"][enc.codes.long()]
