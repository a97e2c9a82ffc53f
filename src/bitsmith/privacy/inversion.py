"""Gradient inversion: reconstruct a client's examples from the gradient it shares in federated learning.

* **DLG** (Zhu, Liu, Han, "Deep Leakage from Gradients", NeurIPS 2019): dummy inputs and dummy label logits start
  from Gaussian noise and are optimised with L-BFGS (lr 1) so that the gradient they produce matches the shared one
  in squared L2 distance; the labels come out as ``softmax`` of the logits.
* **Gradient similarity** (Geiping, Bauermeister, Droege, Moeller, "Inverting Gradients", NeurIPS 2020): the
  distance is one minus the cosine similarity of the whole gradient vectors, plus ``tv`` times the total variation
  of the images; Adam on the signs of the gradient (lr 0.1, decayed 10x at 3/8, 5/8 and 7/8 of the steps), images
  kept in their valid range, labels given (or inferred, ``infer_label``), the best of ``restarts`` kept.

``matched_scores`` pairs every reconstruction with an original (Hungarian matching on MSE: a batch's order is not
known to the attacker) and scores MSE, PSNR and SSIM.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy against class indices or against a probability per class."""
    if target.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(logits, target)
    return -(target * F.log_softmax(logits, -1)).sum(-1).mean()


def gradients_of(model: nn.Module, x: Tensor, y: Tensor, create_graph: bool = False) -> list[Tensor]:
    """The gradient of the (mean) cross-entropy of ``(x, y)`` for every trainable parameter: what a client shares."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(_soft_cross_entropy(model(x), y), params, create_graph=create_graph)
    return list(grads) if create_graph else [g.detach() for g in grads]


def infer_label(last_weight_gradient: Tensor) -> int:
    """iDLG's label of a single example: with cross-entropy after non-negative features, only the true class's row
    of the last layer's weight gradient sums below zero."""
    return int(last_weight_gradient.sum(-1).argmin())


def dlg(model: nn.Module, shared: list[Tensor], shape: tuple[int, ...], classes: int, steps: int = 100,
        seed: int = 0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """DLG's reconstruction of the ``shape`` batch behind the gradient ``shared``: (inputs, label probabilities)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).requires_grad_()
    logits = torch.randn(shape[0], classes, generator=generator).requires_grad_()
    optimizer = torch.optim.LBFGS([x, logits], lr=1.0)

    def closure() -> Tensor:
        optimizer.zero_grad()
        grads = gradients_of(model, x, F.softmax(logits, -1), create_graph=True)
        distance = sum(((g - s) ** 2).sum() for g, s in zip(grads, shared, strict=True))
        distance.backward()
        return distance

    for _ in range(steps):
        optimizer.step(closure)
    return x.detach(), F.softmax(logits, -1).detach()


def total_variation(x: Tensor) -> Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def cosine_distance(grads: list[Tensor], shared: list[Tensor]) -> Tensor:
    """``1 - <g, s> / (|g| |s|)`` over all the gradient tensors at once."""
    dot = sum((g * s).sum() for g, s in zip(grads, shared, strict=True))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads)) * torch.sqrt(sum(s.pow(2).sum() for s in shared))
    return 1 - dot / norm.clamp(min=1e-12)


def gradient_similarity(model: nn.Module, shared: list[Tensor], shape: tuple[int, ...], labels: Tensor,
                        steps: int = 1000, lr: float = 0.1, tv: float = 1e-4, restarts: int = 1,
                        bounds: tuple[float, float] = (0.0, 1.0), seed: int = 0) -> Tensor:  # fmt: skip
    """Geiping et al.'s reconstruction of the ``shape`` batch with ``labels`` behind the gradient ``shared``."""
    best, best_loss = None, float("inf")
    for restart in range(restarts):
        generator = torch.Generator().manual_seed(seed * 1000 + restart)
        x = torch.randn(shape, generator=generator).clamp(*bounds).requires_grad_()
        optimizer = torch.optim.Adam([x], lr=lr)
        milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = cosine_distance(gradients_of(model, x, labels, create_graph=True), shared) + tv * total_variation(x)
            loss.backward()
            x.grad.sign_()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                x.clamp_(*bounds)
        final = float(cosine_distance(gradients_of(model, x, labels), shared) + tv * total_variation(x.detach()))
        if final < best_loss:
            best, best_loss = x.detach(), final
    assert best is not None
    return best


def ssim(images: Tensor, references: Tensor) -> Tensor:
    """Per-image SSIM (torchmetrics) of images in [0, 1]; the Gaussian window shrinks to fit small images."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    side = min(images.shape[-2:])
    kernel = min(11, side - 1 if side % 2 == 0 else side)
    return structural_similarity_index_measure(images, references, data_range=1.0, kernel_size=kernel,
                                               reduction="none")  # fmt: skip


def matched_scores(reconstructions: Tensor, originals: Tensor) -> dict[str, Any]:
    """MSE, PSNR and SSIM of each reconstruction against the original it matches best (Hungarian on MSE), means
    over the batch, and the matching (``order[i]``: the reconstruction paired with original ``i``)."""
    from scipy.optimize import linear_sum_assignment

    recon = reconstructions.detach().clamp(0, 1)
    cost = (originals.flatten(1)[:, None, :] - recon.flatten(1)[None, :, :]).pow(2).mean(-1)  # originals x recons
    rows, cols = linear_sum_assignment(cost.numpy())
    order = torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]
    mse = cost[torch.arange(len(order)), order]
    return {"mse": float(mse.mean()), "psnr": float((10 * torch.log10(1 / mse.clamp(min=1e-10))).mean()),
            "ssim": float(ssim(recon[order], originals).mean()), "order": order.tolist()}  # fmt: skip
