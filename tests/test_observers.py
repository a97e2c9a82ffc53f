"""Range observers on data with known answers."""

from __future__ import annotations

import pytest
import torch

from bitsmith.quant.observers import build_observer


def _rows(*values: float) -> torch.Tensor:
    return torch.tensor([values])


def test_minmax_over_batches() -> None:
    obs = build_observer("minmax")
    obs.update(_rows(-1.0, 2.0))
    obs.update(_rows(-3.0, 1.0))
    lo, hi = obs.compute(0, 255, False)
    assert lo.item() == -3.0 and hi.item() == 2.0


def test_moving_average_minmax() -> None:
    obs = build_observer("ema", momentum=0.5)
    obs.update(_rows(0.0, 2.0))
    obs.update(_rows(0.0, 4.0))
    assert obs.compute(0, 255, False)[1].item() == 3.0


def test_percentile_ignores_outliers() -> None:
    x = torch.cat([torch.linspace(-1, 1, 10_000), torch.tensor([100.0])])[None]
    obs = build_observer("percentile", percentile=99.9)
    obs.update(x)
    lo, hi = obs.compute(-128, 127, True)
    assert 0.9 < hi.item() < 1.01 and lo.item() == -hi.item()


def test_mse_clips_heavy_tails_and_beats_minmax() -> None:
    with torch.random.fork_rng():  # StudentT samples from the global generator: fix it, restore it after
        torch.manual_seed(0)
        x = torch.distributions.StudentT(2.0).sample((1, 50_000))
    x[0, 0] = 200.0
    mse, mm = build_observer("mse"), build_observer("minmax")
    mse.update(x)
    mm.update(x)
    lo, hi = mse.compute(-8, 7, True)
    assert hi.item() < 100.0


def test_kl_threshold_below_max_for_long_tail() -> None:
    x = torch.cat([torch.randn(50_000, generator=torch.Generator().manual_seed(0)), torch.tensor([60.0])])[None]
    obs = build_observer("kl")
    obs.update(x)
    lo, hi = obs.compute(-128, 127, True)
    assert 2.0 < hi.item() < 30.0 and lo.item() < 0


def test_per_row_statistics() -> None:
    obs = build_observer("mse")
    obs.update(torch.stack([torch.linspace(-1, 1, 101), torch.linspace(-10, 10, 101)]))
    lo, hi = obs.compute(-8, 7, True)
    assert hi.shape == (2,) and hi[1] > 5 * hi[0]


def test_kl_threshold_tries_every_bin_like_tensorrt() -> None:
    """Every candidate edge from ``levels`` to ``bins`` (stride 1), each scored like TensorRT's reference loop."""
    import numpy as np

    from bitsmith.quant.observers import _kl_threshold

    values = np.abs(np.random.default_rng(0).standard_t(3, 20000))
    hist, edges = np.histogram(values, bins=512, range=(0.0, float(values.max())))
    best, best_i = np.inf, 512
    for i in range(64, 513):  # the reference: chunks from np.array_split, spread over non-empty bins
        p, nonzero, q = hist[:i].astype(float), hist[:i] != 0, np.zeros(i)
        p[-1] += hist[i:].sum()
        for chunk in np.array_split(np.arange(i), 64):
            if nonzero[chunk].sum():
                q[chunk] = np.where(nonzero[chunk], hist[chunk].sum() / nonzero[chunk].sum(), 0.0)
        p, q = p / p.sum(), q / q.sum()
        kl = float(np.sum(p[p > 0] * np.log(p[p > 0] / np.maximum(q[p > 0], 1e-12))))
        best, best_i = (kl, i) if kl < best else (best, best_i)
    assert _kl_threshold(values, 64, bins=512) == pytest.approx(float(edges[best_i]))
    assert _kl_threshold(values, 64, bins=512, stride=16) != pytest.approx(float(edges[best_i]))  # strides skip it
