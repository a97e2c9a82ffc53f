"""Image restoration as a task: weathered Fashion-MNIST images (``bitsmith.zoo.weather``: noise, blur, contrast and
streaks, several at once) and their clean originals. The metric is ``psnr`` (mean per-image PSNR in dB of the
restored images against the clean ones); training minimises the mean squared error to the clean image."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bitsmith.eval.tasks import ImageBatches
from bitsmith.method import eval_mode
from bitsmith.zoo.weather import psnr


@dataclass
class RestorationTask(ImageBatches):
    """PSNR on ``test`` (weathered, clean); calibration batches of weathered images; ``train`` pairs for training."""

    test: tuple[Tensor, Tensor]
    train: tuple[Tensor, Tensor]
    calibration: list[Tensor]
    kind: str = "restoration"

    @staticmethod
    def loss(restored: Tensor, clean: Tensor) -> Tensor:
        """The training loss: mean squared error to the clean image."""
        return nn.functional.mse_loss(restored, clean)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 250) -> dict[str, float]:
        weathered, clean = self.test
        with eval_mode(model):
            scores = [
                psnr(model(x), y) for x, y in zip(weathered.split(batch_size), clean.split(batch_size), strict=True)
            ]
        return {"psnr": float(torch.cat(scores).mean())}


def restoration_task(root: str | None, eval_size: int, train_size: int, calib_size: int, calib_batch_size: int,
                     seed: int) -> RestorationTask:  # fmt: skip
    """Weathered Fashion-MNIST: ``eval_size`` test images (weathers seeded by ``seed + 1``), ``train_size`` training
    images (seeded by ``seed``), the first ``calib_size`` of those as calibration batches."""
    from bitsmith.data import subset
    from bitsmith.zoo.data import load_fashion_mnist
    from bitsmith.zoo.weather import weathered

    train = subset(*load_fashion_mnist("train", root), train_size, seed=seed)[0]
    test = subset(*load_fashion_mnist("test", root), eval_size, seed=seed + 1)[0]
    x, clean, _ = weathered(train, seed=seed)
    xt, clean_t, _ = weathered(test, seed=seed + 1)
    calibration = list(x[:calib_size].split(calib_batch_size))
    return RestorationTask((xt, clean_t), (x, clean), calibration)
