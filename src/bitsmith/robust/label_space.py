"""Targeted transfer attacks across disjoint label spaces — Inkawhich, Liang, Zhang, Yang, Li, Chen, "Can Targeted
Adversarial Examples Transfer When the Source and Target Models Have No Label Space Overlap?", ICCV-W 2021.

The attacker's white-box surrogate knows other classes, trained on other data (here: MNIST digits against a
Fashion-MNIST model). Offline, a *class correspondence matrix* ``C[s, t]`` records which black-box class ``t`` the
black box predicts for the surrogate's images of class ``s`` (queries of clean data only). Online, to make the
black box say ``t``, the attack picks the proxy class ``s* = argmax_s C[s, t]`` and runs a targeted PGD on the
surrogate toward ``s*``. Deviation: the paper's proxy representations are class centroids in feature space with
several proxies per target; one proxy class and the surrogate's logits are used here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bitsmith.robust.attacks import AttackSpec, attacking, pgd_steps
from bitsmith.train import predict


def correspondence(blackbox: nn.Module, images: Tensor, labels: Tensor, classes: int) -> Tensor:
    """``(surrogate classes, black-box classes)``: the share of each surrogate class's images the black box puts in
    each of its ``classes`` classes."""
    predicted = predict(blackbox, images)
    source = int(labels.max()) + 1
    matrix = torch.zeros(source, classes)
    matrix.index_put_((labels, predicted), torch.ones(len(labels)), accumulate=True)
    return matrix / matrix.sum(1, keepdim=True).clamp_min(1)


def targeted_pgd(model: nn.Module, x: Tensor, target: Tensor, spec: AttackSpec) -> Tensor:
    """PGD that *descends* the cross-entropy of ``target`` (L-inf or L2, no random start)."""
    with attacking(model):
        return pgd_steps(model, x, x.clone(), target, spec, ascend=False)


def label_space_attack(surrogate: nn.Module, blackbox: nn.Module, matrix: Tensor, x: Tensor, target: int,
                       spec: AttackSpec) -> tuple[Tensor, float]:  # fmt: skip
    """Adversarial ``x`` crafted on ``surrogate`` toward the proxy of black-box class ``target``, and the black
    box's targeted success rate (share of the images it now puts in ``target``)."""
    proxy = int(matrix[:, target].argmax())
    adv = targeted_pgd(surrogate, x, torch.full((len(x),), proxy), spec)
    return adv, float((predict(blackbox, adv) == target).float().mean())
