"""A small U-Net-style restorer for 28 x 28 images (the MoFME benchmark's backbone).

Encoder 28 -> 14 -> 7 (convolutions), a bottleneck of ``blocks`` mixer blocks over the 7 x 7 tokens (a depthwise
3 x 3 convolution mixes tokens, then a pre-norm feed-forward network mixes channels: the FFN the mixture-of-experts
methods replace), a decoder with skip connections back to 28 x 28, and a residual output (the network predicts
the correction to its input).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ZOO_ARCH = {"width": 24, "blocks": 4, "ffn_ratio": 4}  # the zoo restorer's size (the restoration task, the benchmark)


class FeedForward(nn.Module):
    """``fc2(GELU(fc1(x)))`` over the last dimension: the block MoE methods swap."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    """Token mixing (depthwise 3 x 3) then channel mixing (pre-norm FFN), both residual."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mix = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mix(x)
        tokens = x.flatten(2).transpose(1, 2)  # B x HW x C
        tokens = tokens + self.ffn(self.norm(tokens))
        return tokens.transpose(1, 2).reshape(x.shape)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GELU())


class Restorer(nn.Module):
    """U-Net-style restorer: ``x + decoder(bottleneck(encoder(x)))``."""

    def __init__(self, width: int = 32, blocks: int = 2, ffn_ratio: int = 4) -> None:
        super().__init__()
        self.enc1 = _conv(1, width)
        self.enc2 = _conv(width, 2 * width, stride=2)
        self.enc3 = _conv(2 * width, 2 * width, stride=2)
        self.bottleneck = nn.Sequential(*[MixerBlock(2 * width, 2 * width * ffn_ratio) for _ in range(blocks)])
        self.up2 = nn.ConvTranspose2d(2 * width, 2 * width, 2, stride=2)
        self.dec2 = _conv(4 * width, width)
        self.up1 = nn.ConvTranspose2d(width, width, 2, stride=2)
        self.dec1 = _conv(2 * width, width)
        self.out = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)  # 28
        e2 = self.enc2(e1)  # 14
        b = self.bottleneck(self.enc3(e2))  # 7
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))  # 14
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))  # 28
        return x + self.out(d1)
