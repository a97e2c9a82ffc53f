"""Generic in-memory data helpers: fixed-seed subsets and mini-batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def subset(images: Tensor, labels: Tensor, size: int | None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed-seed random subset of ``size`` examples (all of them when ``size`` is None)."""
    if size is None or size >= images.shape[0]:
        return images, labels
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:size]
    return images[idx], labels[idx]


def batches(
    images: Tensor, labels: Tensor, batch_size: int, shuffle: bool = False, seed: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches from in-memory tensors (faster than a DataLoader for data this small)."""
    n = images.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield images[idx], labels[idx]
