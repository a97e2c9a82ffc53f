"""Fashion-MNIST with a private attribute: every image rendered in one of four "device styles".

The privacy papers use faces (gender, identity), which are not available here. Instead each image is taken by one
of four devices, each with a fixed rendering, and the device is the private attribute:

* ``plain``: the image as it is;
* ``washed``: low contrast and brighter (``0.6 x + 0.3``);
* ``soft``: a 3x3 box blur;
* ``striped``: a fixed diagonal stripe texture of amplitude 0.12 added.

The device is drawn independently of the garment (seeded), so it is not a function of any task label. The
downstream tasks are the garment class and a coarse grouping unknown at training time (tops, bottoms and dresses,
footwear, bags).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

STYLES = ("plain", "washed", "soft", "striped")
COARSE = ("top", "bottom or dress", "footwear", "bag")
_COARSE_OF = torch.tensor([0, 1, 0, 1, 0, 2, 0, 2, 3, 2])  # T-shirt, Trouser, Pullover, Dress, Coat, Sandal, ...


def stripes(size: int = 28, period: int = 6, amplitude: float = 0.12) -> Tensor:
    """The ``striped`` device's fixed texture (``1 x size x size``)."""
    i = torch.arange(size)
    return amplitude * (((i[:, None] + i[None, :]) % period) < period // 2).float()[None]


def render(images: Tensor, styles: Tensor) -> Tensor:
    """``images`` (``N x 1 x H x W`` in [0, 1]) as the devices ``styles`` (``N`` ints in 0..3) render them."""
    out_of_range = styles.numel() > 0 and (int(styles.min()) < 0 or int(styles.max()) >= len(STYLES))
    if styles.shape != (images.shape[0],) or out_of_range:
        raise ValueError(f"styles: one device per image, in 0..{len(STYLES) - 1} ({', '.join(STYLES)})")
    out = images.clone()
    kind = styles.view(-1, 1, 1, 1)
    out = torch.where(kind == 1, 0.6 * images + 0.3, out)
    out = torch.where(kind == 2, F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1), out)
    out = torch.where(kind == 3, images + stripes(images.shape[-1]), out)
    return out.clamp(0.0, 1.0)


def styled(images: Tensor, labels: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """The images rendered by random devices: ``images``, ``style`` (private), ``label`` and ``coarse`` (tasks)."""
    generator = torch.Generator().manual_seed(seed)
    style = torch.randint(0, len(STYLES), (images.shape[0],), generator=generator)
    return {"images": render(images, style), "style": style, "label": labels, "coarse": _COARSE_OF[labels]}
