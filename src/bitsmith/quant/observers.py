"""Range observers: turn calibration statistics into a clipping range ``[lo, hi]`` per row.

A *row* is the unit that shares one scale (the whole tensor, one channel, one group or one token);
observers see tensors reshaped to ``(rows, elements)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from bitsmith.quant.functional import fake_binary, fake_quant, params_from_range
from bitsmith.registry import Registry

OBSERVERS: Registry[Observer] = Registry("observer")


class Observer:
    """Accumulates statistics with ``update(rows)``; ``compute`` returns ``(lo, hi)``, each ``(R,)``."""

    def update(self, rows: Tensor) -> None:
        raise NotImplementedError

    def compute(self, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


@OBSERVERS.register("minmax")
class MinMaxObserver(Observer):
    """Running minimum and maximum over all calibration data."""

    def __init__(self) -> None:
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None

    def update(self, rows: Tensor) -> None:
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def compute(self, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        if self.lo is None or self.hi is None:
            raise ValueError("observer saw no data; run calibration batches through the model first")
        return self.lo, self.hi


@OBSERVERS.register("ema")
class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min/max: ``r <- (1-m) r + m r_batch``."""

    def __init__(self, momentum: float = 0.01) -> None:
        super().__init__()
        self.momentum = momentum

    def update(self, rows: Tensor) -> None:
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = (1 - self.momentum) * self.lo + self.momentum * lo
            self.hi = (1 - self.momentum) * self.hi + self.momentum * hi


@OBSERVERS.register("absmean")
class AbsMeanObserver(Observer):
    """Mean of |x| per row, as the symmetric range ``[-m, m]``: a binary (1-bit) quantizer's levels
    ``sign(x) * mean|x|``, the L2-optimal binary scale (XNOR-Net; GEMQ's official 1-bit quantizer)."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def update(self, rows: Tensor) -> None:
        sums = rows.abs().sum(dim=1)
        self.total = sums if self.total is None else self.total + sums
        self.count += rows.shape[1]

    def compute(self, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        if self.total is None:
            raise ValueError("observer saw no data; run calibration batches through the model first")
        mean = self.total / self.count
        return -mean, mean


@OBSERVERS.register("percentile")
class PercentileObserver(Observer):
    """Per-batch percentile of the values (of |x| when symmetric), averaged over batches."""

    def __init__(self, percentile: float = 99.99) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.sums: dict[str, Tensor] = {}
        self.batches = 0

    def _kth(self, rows: Tensor, fraction: float) -> Tensor:
        k = min(rows.shape[1], max(1, math.ceil(fraction * rows.shape[1])))
        return rows.kthvalue(k, dim=1).values

    def update(self, rows: Tensor) -> None:
        p = self.percentile / 100.0
        stats = {
            "lo": self._kth(rows, 1.0 - p),
            "hi": self._kth(rows, p),
            "abs": self._kth(rows.abs(), p),
        }
        for key, value in stats.items():
            self.sums[key] = value if key not in self.sums else self.sums[key] + value
        self.batches += 1

    def compute(self, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        if not self.batches:
            raise ValueError("observer saw no data; run calibration batches through the model first")
        mean = {k: v / self.batches for k, v in self.sums.items()}
        if symmetric:
            return -mean["abs"], mean["abs"]
        return mean["lo"], mean["hi"]


class _SampleObserver(MinMaxObserver):
    """Keeps the exact min/max plus a random subsample of each row, for searches over the data."""

    def __init__(self, max_samples: int = 1 << 16, seed: int = 0) -> None:
        super().__init__()
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: list[Tensor] = []

    def _subsample(self, rows: Tensor) -> Tensor:
        if rows.shape[1] <= self.max_samples:
            return rows
        # with replacement: randperm over tens of millions of activations costs ~1 s per batch
        idx = torch.randint(rows.shape[1], (self.max_samples,), generator=self.generator)
        return rows[:, idx]

    def update(self, rows: Tensor) -> None:
        super().update(rows)
        self.samples.append(self._subsample(rows.float()))
        if sum(s.shape[1] for s in self.samples) > 2 * self.max_samples:
            self.samples = [self._subsample(torch.cat(self.samples, dim=1))]

    def data(self) -> Tensor:
        if not self.samples:
            raise ValueError("observer saw no data; run calibration batches through the model first")
        return torch.cat(self.samples, dim=1)


@OBSERVERS.register("mse")
class MSEObserver(_SampleObserver):
    """Clipping range minimising ``||Q(x) - x||^2`` over ``[lo, hi] * i / K``, ``i = 1..K``, per row."""

    def __init__(self, candidates: int = 100, max_samples: int = 1 << 16, seed: int = 0) -> None:
        super().__init__(max_samples, seed)
        self.candidates = candidates

    def compute(self, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        x = self.data()  # (R, K)
        lo, hi = super().compute(qmin, qmax, symmetric)
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for i in range(1, self.candidates + 1):
            c_lo, c_hi = lo * i / self.candidates, hi * i / self.candidates
            scale, zp = params_from_range(c_lo, c_hi, qmin, qmax, symmetric)
            if qmin == -1 and qmax == 1 and symmetric:  # binary quantizer: levels {-s, +s}
                xq = fake_binary(x, scale[:, None])
            else:
                xq = fake_quant(x, scale[:, None], zp[:, None], qmin, qmax)
            err = (xq - x).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, c_lo, best_lo)
            best_hi = torch.where(better, c_hi, best_hi)
        return best_lo, best_hi


def _kl_threshold(values: np.ndarray, levels: int, bins: int = 2048, stride: int = 1) -> float:
    """TensorRT-style entropy calibration: the |x| threshold minimising KL(P || Q) of the histogram, over every
    candidate bin edge from ``levels`` to ``bins`` (``stride`` 1, as TensorRT's reference does)."""
    amax = float(values.max()) if values.size else 0.0
    if amax == 0.0:
        return 0.0
    hist, edges = np.histogram(values, bins=bins, range=(0.0, amax))
    hist = hist.astype(np.float64)
    best_kl, best_i = np.inf, bins
    for i in range(max(levels, 1), bins + 1, stride):
        kl = _kl_at(hist, i, levels)
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(edges[min(best_i, bins)])


def _kl_at(hist: np.ndarray, i: int, levels: int) -> float:
    """KL(P || Q) for the threshold at bin ``i``: P is the histogram clipped into its first ``i`` bins, Q the
    same bins merged into ``levels`` chunks (as ``np.array_split`` splits them) and spread back over each
    chunk's non-empty bins."""
    p = hist[:i].copy()
    p[-1] += hist[i:].sum()
    nonzero = hist[:i] != 0
    sizes = np.full(levels, i // levels)
    sizes[: i % levels] += 1
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    totals = np.add.reduceat(hist[:i], starts)
    counts = np.add.reduceat(nonzero.astype(np.float64), starts)
    per_bin = np.divide(totals, counts, out=np.zeros(levels), where=counts > 0)
    q = np.where(nonzero, np.repeat(per_bin, sizes), 0.0)
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return np.inf
    p, q = p / p_sum, q / q_sum
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


@OBSERVERS.register("kl")
class KLObserver(_SampleObserver):
    """Entropy (KL-divergence) calibration on a 2048-bin histogram of |x|, per row."""

    def __init__(self, bins: int = 2048, max_samples: int = 1 << 16, seed: int = 0) -> None:
        super().__init__(max_samples, seed)
        self.bins = bins

    def compute(self, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        x = self.data()
        lo, hi = super().compute(qmin, qmax, symmetric)
        levels_all = qmax - qmin + 1
        thresholds = []
        for row, row_lo in zip(x.abs().numpy(), lo.tolist(), strict=False):
            levels = levels_all // 2 if (symmetric or row_lo < 0) else levels_all
            thresholds.append(_kl_threshold(row, levels, self.bins))
        t = torch.tensor(thresholds, dtype=lo.dtype)
        return torch.maximum(lo, -t), torch.minimum(hi, t)


def build_observer(name: str, **options: object) -> Observer:
    return OBSERVERS.get(name)(**options)
