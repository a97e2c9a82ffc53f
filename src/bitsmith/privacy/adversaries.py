"""Adversaries trained on released features: attribute inference and reconstruction.

Both are trained afresh on (features, target) pairs of a training split and scored on a test split, so a defense
is measured by an adversary that adapts to it, not by the one it was trained against. Features of any shape are
flattened; the adversaries are small MLPs (Adam, full batches of 256, ``epochs`` passes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _mlp(inputs: int, outputs: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, outputs))  # fmt: skip


def _train(model: nn.Module, x: Tensor, target: Tensor, loss_fn: Any, epochs: int, lr: float, seed: int) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 256):
            rows = order[i : i + 256]
            loss = loss_fn(model(x[rows]), target[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _check(train: Tensor, train_target: Tensor, test: Tensor, test_target: Tensor) -> None:
    if len(train) != len(train_target) or len(test) != len(test_target) or not len(train) or not len(test):
        raise ValueError(f"adversary: features and targets must pair up and be non-empty (train {len(train)} / "
                         f"{len(train_target)}, test {len(test)} / {len(test_target)})")  # fmt: skip


def attribute_inference(train_features: Tensor, train_attribute: Tensor, test_features: Tensor,
                        test_attribute: Tensor, epochs: int = 30, hidden: int = 128, lr: float = 1e-3,
                        seed: int = 0) -> float:  # fmt: skip
    """Test accuracy of a fresh classifier that reads the private attribute from released features."""
    _check(train_features, train_attribute, test_features, test_attribute)
    with torch.random.fork_rng():  # seeded; the caller's random stream is left as it was
        torch.manual_seed(seed)
        x, xt = train_features.detach().flatten(1), test_features.detach().flatten(1)
        classes = int(max(train_attribute.max(), test_attribute.max())) + 1
        head = _train(_mlp(x.shape[1], classes, hidden), x, train_attribute, F.cross_entropy, epochs, lr, seed)
    with torch.no_grad():
        return float((head(xt).argmax(-1) == test_attribute).float().mean())


def reconstruction_attack(train_features: Tensor, train_images: Tensor, test_features: Tensor, test_images: Tensor,
                          epochs: int = 30, hidden: int = 512, lr: float = 1e-3, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """A fresh decoder trained to invert released features into images in [0, 1]; PSNR, SSIM and MSE of its
    reconstructions of the test images, and the reconstructions themselves."""
    from bitsmith.privacy.inversion import ssim

    _check(train_features, train_images, test_features, test_images)
    with torch.random.fork_rng():  # seeded; the caller's random stream is left as it was
        torch.manual_seed(seed)
        x, xt = train_features.detach().flatten(1), test_features.detach().flatten(1)
        shape = train_images.shape[1:]
        decoder = nn.Sequential(_mlp(x.shape[1], train_images[0].numel(), hidden), nn.Sigmoid(),
                                nn.Unflatten(1, shape))  # fmt: skip
        _train(decoder, x, train_images, F.mse_loss, epochs, lr, seed)
    with torch.no_grad():
        recon = decoder(xt)
    mse = (recon - test_images).pow(2).flatten(1).mean(1)
    return {"mse": float(mse.mean()), "psnr": float((10 * torch.log10(1 / mse.clamp(min=1e-10))).mean()),
            "ssim": float(ssim(recon, test_images).mean()),
            "reconstructions": recon}  # fmt: skip
