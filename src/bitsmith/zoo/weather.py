"""Multi-weather restoration data: Fashion-MNIST images under several "weathers" at once (MoFME's deweather task,
rebuilt on the data we have).

Each image gets every weather independently with probability 1/2 (at least one), applied in this order and
clamped to [0, 1]: ``contrast`` (``0.4 x + 0.3``), ``blur`` (3x3 box), ``streaks`` (six bright slanted rain
streaks of 8 pixels at random places) and ``noise`` (Gaussian, std 0.15). The clean image is the target; the
applied weathers come back as a 0/1 matrix (``images x 4``) so results can be read per weather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

WEATHERS = ("contrast", "blur", "streaks", "noise")


def _streaks(count: int, size: int, generator: torch.Generator) -> Tensor:
    """``count x 1 x size x size`` masks of six slanted streaks each (1 on a streak)."""
    masks = torch.zeros(count, 1, size, size)
    length = 8
    for i in range(count):
        starts = torch.randint(0, size - length, (6, 2), generator=generator)
        for row, col in starts.tolist():
            steps = torch.arange(length)
            masks[i, 0, row + steps, col + steps // 2] = 1.0
    return masks


def apply_weather(images: Tensor, present: Tensor, generator: torch.Generator) -> Tensor:
    """``images`` (``N x 1 x H x W`` in [0, 1]) under the weathers marked in ``present`` (``N x 4``)."""
    if images.dim() != 4 or present.shape != (images.shape[0], len(WEATHERS)):
        raise ValueError(f"weather: images N x C x H x W and present N x {len(WEATHERS)}; got {tuple(images.shape)} "
                         f"and {tuple(present.shape)}")  # fmt: skip
    x = images.clone()
    on = {name: present[:, i].bool().view(-1, 1, 1, 1) for i, name in enumerate(WEATHERS)}
    x = torch.where(on["contrast"], 0.4 * x + 0.3, x)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where(on["blur"], blurred, x)
    streaks = _streaks(x.shape[0], x.shape[-1], generator)
    x = torch.where(on["streaks"] & (streaks > 0), torch.maximum(x, torch.full_like(x, 0.85)), x)
    noise = 0.15 * torch.randn(x.shape, generator=generator)
    x = torch.where(on["noise"], x + noise, x)
    return x.clamp(0.0, 1.0)


def weathered(images: Tensor, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(corrupted, clean, present)``: each image under a random non-empty set of weathers (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    present = torch.rand(images.shape[0], len(WEATHERS), generator=generator) < 0.5
    none = ~present.any(1)
    present[none, torch.randint(0, len(WEATHERS), (int(none.sum()),), generator=generator)] = True
    return apply_weather(images, present, generator), images, present.float()


def psnr(restored: Tensor, clean: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1]."""
    mse = (restored.clamp(0, 1) - clean).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1.0 / mse)
