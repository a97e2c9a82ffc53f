"""Detection scenes composed of Fashion-MNIST items (the DPatch benchmark's data).

Each canvas (``size x size``, black) holds 1-4 items: a Fashion-MNIST image cropped to its non-zero pixels,
resized by a random scale (``min_scale`` .. ``max_scale`` of its 28-pixel frame) and pasted at a random place
(items may touch but not overlap: a placement that would overlap is retried). The boxes are the pasted crops'
extents in pixels ``(x1, y1, x2, y2)``, the labels the garment classes; everything is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Scenes:
    """``images`` (``N x 1 x size x size``) with per-image ``boxes`` (``k x 4``, float pixels) and ``labels``."""

    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]

    def __len__(self) -> int:
        return self.images.shape[0]


def _crop(item: Tensor) -> Tensor:
    """The item's non-zero extent (the whole frame if it is empty)."""
    rows, cols = (item[0] > 0.05).any(1).nonzero(), (item[0] > 0.05).any(0).nonzero()
    if not len(rows) or not len(cols):
        return item
    return item[:, int(rows.min()) : int(rows.max()) + 1, int(cols.min()) : int(cols.max()) + 1]


def compose(items: Tensor, labels: Tensor, count: int, size: int = 64, min_scale: float = 0.6,
            max_scale: float = 1.2, seed: int = 0) -> Scenes:  # fmt: skip
    """``count`` scenes drawn from ``items`` (``M x 1 x 28 x 28`` in [0, 1]) and their ``labels``."""
    if not 0 < min_scale <= max_scale or max_scale * 28 > size:
        raise ValueError(f"scenes: scales {min_scale}..{max_scale} must be positive, ordered, and fit a {size}-pixel "
                         f"canvas (at most {size / 28:.2f})")  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 1, size, size)
    all_boxes, all_labels = [], []
    for n in range(count):
        wanted = int(torch.randint(1, 5, (1,), generator=generator))
        boxes: list[list[float]] = []
        kinds: list[int] = []
        for _ in range(wanted):
            pick = int(torch.randint(0, len(items), (1,), generator=generator))
            crop = _crop(items[pick])
            scale = min_scale + (max_scale - min_scale) * float(torch.rand(1, generator=generator))
            h, w = max(2, round(crop.shape[1] * scale)), max(2, round(crop.shape[2] * scale))
            resized = F.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp(0, 1)
            for _attempt in range(20):
                y = int(torch.randint(0, size - h + 1, (1,), generator=generator))
                x = int(torch.randint(0, size - w + 1, (1,), generator=generator))
                if all(x >= b[2] or x + w <= b[0] or y >= b[3] or y + h <= b[1] for b in boxes):
                    images[n, :, y : y + h, x : x + w] = resized
                    boxes.append([float(x), float(y), float(x + w), float(y + h)])
                    kinds.append(int(labels[pick]))
                    break
        all_boxes.append(torch.tensor(boxes))
        all_labels.append(torch.tensor(kinds, dtype=torch.long))
    return Scenes(images, all_boxes, all_labels)
