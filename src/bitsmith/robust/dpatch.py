"""DPatch (Liu, Yang, Liu, Li, Chen, "DPatch: An Adversarial Patch Attack on Object Detectors", 2018): one small
patch, pasted at a random place in every image, trained against a detector's own training losses.

* **Untargeted**: the patch ascends the detector's total loss on the images' true objects, so every head (class
  heatmap, box size, offset; in the paper classification and box regression) is disabled at once.
* **Targeted**: the patch descends the loss of a target in which the only object is the patch itself, labelled
  ``target``: the detector sees the patch as that class and nothing else.

Each step pastes the patch at a fresh random place per image (the attack is location-independent by
construction) and takes a signed gradient step of ``lr`` on the patch, kept in [0, 1]; the detector is frozen. The
Adversarial Robustness Toolbox has DPatch, but its PyTorch detector wrapper needs torchvision, which does not load
with this CPU build of PyTorch: this is bitsmith's own implementation of the paper's procedure.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

Losses = Callable[[Tensor, list[dict[str, Tensor]]], dict[str, Tensor]]


def paste(images: Tensor, patch: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``images`` with ``patch`` pasted at a random place in each; the patches' boxes (``N x 4``, x1 y1 x2 y2)."""
    _, h, w = patch.shape
    size = images.shape[-1]
    if h > images.shape[-2] or w > size:
        raise ValueError(f"dpatch: a {h}x{w} patch does not fit {images.shape[-2]}x{size} images; use a smaller "
                         "patch_size")  # fmt: skip
    ys = torch.randint(0, images.shape[-2] - h + 1, (len(images),), generator=generator)
    xs = torch.randint(0, size - w + 1, (len(images),), generator=generator)
    out = images.clone()
    for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist(), strict=True)):
        out[i, :, y : y + h, x : x + w] = patch
    boxes = torch.stack([xs, ys, xs + w, ys + h], 1).float()
    return out, boxes


def train_dpatch(detector: nn.Module, images: Tensor, targets: list[dict[str, Tensor]], patch_size: int = 12,
                 steps: int = 300, batch_size: int = 32, lr: float = 0.01, target: int | None = None,
                 seed: int = 0) -> Tensor:  # fmt: skip
    """A DPatch (``1 x patch_size x patch_size`` in [0, 1]) against ``detector`` (which has ``losses(images,
    targets)``), untargeted, or targeted at class ``target``."""
    generator = torch.Generator().manual_seed(seed)
    patch = torch.rand(images.shape[1], patch_size, patch_size, generator=generator).requires_grad_()
    was_training = detector.training
    detector.eval()  # frozen: batch-norm statistics stay the detector's
    for p in detector.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            rows = torch.randint(0, len(images), (batch_size,), generator=generator)
            patched, boxes = paste(images[rows], patch, generator)
            if target is None:
                goal = [targets[int(r)] for r in rows]
            else:
                goal = [{"boxes": box[None], "labels": torch.tensor([target])} for box in boxes]
            loss = sum(detector.losses(patched, goal).values())
            (grad,) = torch.autograd.grad(loss, patch)
            with torch.no_grad():
                patch += (lr if target is None else -lr) * grad.sign()  # ascend (untargeted), descend (targeted)
                patch.clamp_(0.0, 1.0)
    finally:
        for p in detector.parameters():
            p.requires_grad_(True)
        detector.train(was_training)
    return patch.detach()
