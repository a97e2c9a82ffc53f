"""CLAT — Criticality-Leveraged Adversarial Training; Gopal, Yang, Zhang, Horton, Chen, "Criticality Leveraged
Adversarial Training (CLAT) for Boosted Performance via Parameter Efficiency", arXiv 2408.10204 (ICML 2025). Spec: ``shared/methods/clat.md``
(no public code; the equations are the spec's reading of the abstract and reviews).

Adversarial fine-tuning of only the layers that learn the most non-robust features, on top of an adversarially
trained model:

* *criticality* of a layer with output ``f_i``: ``C_i = E_x ||f_i(x_adv) - f_i(x)||^2 / ||f_i(x)||^2`` (per example,
  then averaged), ``x_adv`` the PGD example;
* the layers with the largest ``C_i`` are made trainable, greedily in that order while the trainable share of the
  parameters stays within ``budget`` (default 5 %; at least one layer), the rest frozen; the selection is redone
  every ``reselect_every`` epochs on the calibration images;
* loss ``CE(f(x_adv), y) + lam * sum_{i in S} C_i`` on each batch; the criticality term's two extra forward passes
  (clean and adversarial) leave the batch norms' running statistics alone (``frozen_norm_statistics``), so only
  the training forward itself moves them, as in plain adversarial training.

Deviations: the criticality at selection time attacks the model's own predictions on the (unlabelled) calibration
images; the layers are the Conv2d / Linear modules (their weight and bias count as their parameters); the spec's
"uniform vector" approximation of the input gradient is not used (the PGD example is computed exactly).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.method import eval_mode, frozen_norm_statistics, register_method
from bitsmith.methods.robust.adv_train import PGDSettings
from bitsmith.robust.attacks import pgd

SELECTION_IMAGES = 256  # calibration images kept for re-selection


def parameter_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def layer_outputs(model: nn.Module, names: Iterable[str], x: Tensor) -> dict[str, Tensor]:
    """The outputs of the named layers when ``model`` runs on ``x`` (with gradients if enabled)."""
    seen: dict[str, Tensor] = {}
    layers = parameter_layers(model)
    handles = [layers[n].register_forward_hook(lambda _m, _i, out, n=n: seen.__setitem__(n, out)) for n in names]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def train_only(model: nn.Module, names: Iterable[str]) -> None:
    """Freeze every parameter but those of the named Conv2d / Linear layers."""
    trainable = {id(p) for name in names for p in parameter_layers(model)[name].parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def criticality(clean: dict[str, Tensor], adversarial: dict[str, Tensor]) -> dict[str, Tensor]:
    """``C_i`` per layer: the mean over examples of ``||f_i(x_adv) - f_i(x)||^2 / ||f_i(x)||^2``."""
    out = {}
    for name, f in clean.items():
        change = (adversarial[name] - f).flatten(1).pow(2).sum(1)
        out[name] = (change / f.flatten(1).pow(2).sum(1).clamp_min(1e-12)).mean()
    return out


@register_method("clat")
@dataclass
class CLAT(PGDSettings):
    """Adversarial fine-tuning of the most critical layers only (pair it with a ``train`` section)."""

    description = "CLAT: adversarial fine-tuning of the ~5 % most non-robust (critical) layers, the rest frozen"

    eps: Annotated[float, Field(ge=0.0)] = 0.1
    budget: Annotated[float, Field(gt=0.0, le=1.0)] = 0.05
    lam: Annotated[float, Field(ge=0.0)] = 0.1
    reselect_every: Annotated[int, Field(ge=1)] = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        self.spec(self.eps)
        self._selected: list[str] = []
        self._images: Tensor | None = None
        self._clean: Tensor | None = None

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        images = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
        self._images = torch.cat(images)[:SELECTION_IMAGES]
        self.select(model)

    def scores(self, model: nn.Module, x: Tensor) -> dict[str, float]:
        """``C_i`` of every Conv2d / Linear layer on images ``x`` (attacking the model's own predictions)."""
        with torch.no_grad(), eval_mode(model):
            y = model(x).argmax(1)
        adv = pgd(model, x, y, self.spec(self.eps))
        names = list(parameter_layers(model))
        with torch.no_grad(), eval_mode(model):
            values = criticality(layer_outputs(model, names, x), layer_outputs(model, names, adv))
        return {name: float(v) for name, v in values.items()}

    def select(self, model: nn.Module) -> None:
        """Make the most critical layers trainable within ``budget`` of the parameters; freeze the rest."""
        assert self._images is not None, "clat needs calibration images (run compress with calibration batches)"
        scores = self.scores(model, self._images)
        layers = parameter_layers(model)
        total = sum(p.numel() for p in model.parameters())
        chosen, used = [], 0
        for name in sorted(scores, key=scores.get, reverse=True):
            size = sum(p.numel() for p in layers[name].parameters())
            if chosen and used + size > self.budget * total:
                continue
            chosen.append(name)
            used += size
        self._selected = chosen
        self._freeze(model)

    def _freeze(self, model: nn.Module) -> None:
        train_only(model, self._selected)

    def perturb(self, model: nn.Module, batch: Any) -> Any:
        x, y = batch
        self._step += 1
        self._clean = x
        return pgd(model, x, y, self.spec(self.eps)), y

    def penalty(self, model: nn.Module, batch: Any) -> Tensor:
        if not self.lam or self._clean is None:
            return torch.zeros(())
        with frozen_norm_statistics(model):
            with torch.no_grad():
                clean = layer_outputs(model, self._selected, self._clean)
            adversarial = layer_outputs(model, self._selected, batch[0])
        return self.lam * sum(criticality(clean, adversarial).values())

    def schedule(self, model: nn.Module, epoch: int, epochs: int) -> bool:
        if epoch % self.reselect_every or epoch == epochs:
            return False
        self.select(model)
        return True

    def resume(self, model: nn.Module, epoch: int, epochs: int) -> None:
        self._freeze(model)

    def state_dict(self) -> dict[str, Any]:
        return {"_step": self._step, "_selected": list(self._selected), "_images": self._images}
