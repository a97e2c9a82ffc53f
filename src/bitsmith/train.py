"""A small training loop with method hooks (``perturb``, ``penalty``) and a plain evaluation loop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.data import batches
from bitsmith.method import Method
from bitsmith.progress import track


@dataclass
class TrainConfig:
    """Optimisation settings (one recipe ``train`` section)."""

    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd (momentum 0.9, nesterov) or adamw
    lr: float = 0.05
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    seed: int = 0


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def fit(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    cfg: TrainConfig,
    methods: list[Method] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` on in-memory data; methods' ``perturb`` and ``penalty`` hooks join every step."""
    methods = methods or []
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(images.shape[0] / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    history, step = [], 0
    model.train()
    for epoch in range(cfg.epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        epoch_batches = batches(images, labels, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch)
        for batch in track(epoch_batches, f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, cfg.lr)
            for method in methods:
                batch = method.perturb(model, batch)
            x, y = batch
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            for method in methods:
                loss = loss + method.penalty(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step}; lower the lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * y.shape[0]
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "train_accuracy": correct / seen})
    model.eval()
    return history


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = 0
    n_batches = math.ceil(images.shape[0] / batch_size)
    for x, y in track(batches(images, labels, batch_size), "evaluating", n_batches):
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / images.shape[0]
