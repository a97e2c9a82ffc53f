"""The restoration task kind: the zoo restorer claimed and built fresh, trained with the task's MSE loss (not
cross-entropy), PSNR as its metric, and the sections it refuses."""

from __future__ import annotations

import pytest
import torch

from bitsmith.eval.restoration import RestorationTask
from bitsmith.recipe import RecipeError, load_recipe
from bitsmith.tasks import task_kind
from bitsmith.train import TrainConfig, fit
from bitsmith.zoo.restorer import Restorer
from bitsmith.zoo.weather import psnr, weathered


def pairs(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.zeros(count, 1, 28, 28)
    for i in range(count):  # bright rectangles: something to restore
        r, c = torch.randint(0, 18, (2,), generator=g).tolist()
        clean[i, 0, r : r + 10, c : c + 10] = 1.0
    corrupted, clean, _ = weathered(clean, seed=seed)
    return corrupted, clean


def test_fit_trains_a_restorer_on_the_tasks_loss() -> None:
    """The task loss is the MSE to the clean image: training raises held-out PSNR above the untrained model's
    (cross-entropy on an image target would not even run)."""
    x, y = pairs(256, 0)
    xt, yt = pairs(64, 1)
    torch.manual_seed(0)
    model = Restorer(width=8, blocks=1)
    task = RestorationTask((xt, yt), (x, y), [x[:32]])
    before = task.evaluate(model)["psnr"]
    history = fit(model, x, y, TrainConfig(epochs=3, batch_size=32, optimizer="adamw", lr=3e-3, weight_decay=0.0),
                  loss_fn=task.loss)  # fmt: skip
    after = task.evaluate(model)["psnr"]
    assert after > before + 1.0
    assert "train_accuracy" not in history[0] and history[-1]["loss"] < history[0]["loss"]
    assert abs(after - float(psnr(model(xt), yt).mean())) < 1e-4


def recipe(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load_recipe(path)[0]


def test_the_restorer_is_claimed_and_attacks_are_refused(tmp_path) -> None:
    assert task_kind(recipe(tmp_path, "model: {name: restorer}\n")).registered_name == "restoration"
    with pytest.raises(RecipeError, match="attack: adversarial attacks evaluate classifiers"):
        recipe(tmp_path, "model: {name: restorer}\nattack: {eps: [0.1]}\n")
