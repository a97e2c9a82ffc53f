"""Sharpness-aware minimisation (Foret et al., ICLR 2021) as two training hooks, so SAM joins any loop that calls
``objective`` and ``after_backward`` (bitsmith's ``fit`` does):

1. ``ascend(params, loss)`` — from the loss at ``theta``, move the parameters to ``theta + rho g / ||g||`` and
   remember the step;
2. the loop back-propagates the loss recomputed at ``theta + eps`` (the SAM gradient);
3. ``descend_back()`` — in ``after_backward``, put the parameters back to ``theta`` before the optimizer steps
   with that gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class SharpnessStep:
    """One SAM perturbation of ``params`` at a time (``rho``: the radius of the L2 ball)."""

    def __init__(self, rho: float) -> None:
        self.rho = rho
        self._moved: list[tuple[nn.Parameter, Tensor]] = []

    def ascend(self, params: Sequence[nn.Parameter], loss: Tensor) -> None:
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        pairs = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        norm = torch.sqrt(sum(g.pow(2).sum() for _, g in pairs)).clamp_min(1e-12) if pairs else torch.ones(())
        with torch.no_grad():
            for p, g in pairs:
                step = self.rho * g / norm
                p.add_(step)
                self._moved.append((p, step))

    def descend_back(self) -> None:
        with torch.no_grad():
            for p, step in self._moved:
                p.sub_(step)
        self._moved = []
