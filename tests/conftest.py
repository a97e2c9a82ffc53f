"""Tiny models and data shared by the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_num_threads(1)


class TinyCNN(nn.Module):
    """Conv -> BN -> ReLU -> Conv -> pool -> Linear -> Linear: the layer kinds methods meet."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.pool(torch.relu(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def make_cnn(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN().eval()


def make_vit(seed: int = 0) -> nn.Module:
    """A two-block ViT for the 12x12 test images."""
    from bitsmith.zoo.vision import ViT

    torch.manual_seed(seed)
    return ViT(patch=4, dim=16, depth=2, heads=2, mlp_dim=32, image=12).eval()


@pytest.fixture
def cnn() -> TinyCNN:
    return make_cnn()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def calib() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 1, 12, 12, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(3)]
