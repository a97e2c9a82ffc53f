"""A classifier of your own for ``examples/own_data/images.yaml``: any callable that returns a ``torch.nn.Module``
works as ``model.factory`` (``package.module:callable``, importable: installed or on ``PYTHONPATH``)."""

from __future__ import annotations

from torch import nn


def tiny_net(classes: int = 3, channels: int = 3, width: int = 16) -> nn.Module:
    """Two convolutions and a linear head, for small images (e.g. 32 x 32)."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(2 * width, classes),
    )  # fmt: skip
