"""SharpBalance — Lu, Liu, Zhou et al., "Sharpness-diversity tradeoff: improving flat ensembles with
SharpBalance", NeurIPS 2024. Spec: ``shared/methods/sharpbalance.md``; official code ``haiquanlu/SharpBalance``
(d16f8fc, ``engine.py``: ``boosting_sam_split``).

SAM makes each member of an ensemble flatter but the members less diverse. SharpBalance trains every member with
SAM (``rho``) on all samples until ``balance_from`` of the epochs, then:

* *per-sample sharpness* of member ``j``: ``s_j(x) = ||grad_theta CE(f_j(x), y)||^2`` (per-sample gradient norm,
  the empirical Fisher trace; ``torch.func.vmap``);
* ``T_j`` = the ``flat_ratio`` fraction of samples with the *smallest* ``s_j`` (the official code sorts ascending);
* member ``i`` is trained with SAM on ``U_{j != i} T_j`` plus its ``i``-th share of the samples in no ``T_j`` (the
  CIFAR-100 variant) and with plain SGD on the rest (mostly its own ``T_i``): each batch is split into the two
  parts, each part's loss weighted by its fraction of the batch.

With ``balance_from: 1.0`` no epoch is balanced: every member trains with SAM on all samples (the *SAM ensemble*
baseline of the paper). The deep ensemble baseline is the ``ensemble`` method.

Deviations: the ranking is within each training batch, recomputed at every step from the current weights (the
official code ranks the whole training set once, at ``initial_epochs``); per-sample gradients are taken in eval
mode (batch-norm running statistics, not batch statistics); a member whose layers ``vmap`` cannot trace falls back
to one backward pass per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from bitsmith import distributed
from bitsmith.ensemble import members_of
from bitsmith.method import Method, eval_mode, register_method
from bitsmith.sam import SharpnessStep


def per_sample_sharpness(member: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``||grad_theta CE(member(x_k), y_k)||^2`` for every sample ``k`` of the batch (trainable parameters only)."""
    params = {name: p.detach() for name, p in member.named_parameters() if p.requires_grad}
    buffers = dict(member.named_buffers())

    def loss_of_one(p: dict[str, Tensor], xk: Tensor, yk: Tensor) -> Tensor:
        out = functional_call(member, {**buffers, **p}, (xk.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yk.unsqueeze(0))

    with eval_mode(member):
        try:
            grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, x, y)
            return sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
        except (RuntimeError, NotImplementedError):  # a layer vmap cannot trace: one backward per sample
            out = []
            for xk, yk in zip(x, y, strict=True):
                gs = torch.autograd.grad(loss_of_one(dict(member.named_parameters()), xk, yk), list(params.values()),
                                         allow_unused=True)  # fmt: skip
                out.append(sum(g.pow(2).sum() for g in gs if g is not None))
            return torch.stack(out).detach()


def flattest(sharpness: Tensor, ratio: float) -> Tensor:
    """Boolean mask of the ``ratio`` fraction of samples with the smallest sharpness."""
    mask = torch.zeros_like(sharpness, dtype=torch.bool)
    mask[sharpness.argsort()[: round(ratio * len(sharpness))]] = True
    return mask


def sam_sets(flat: list[Tensor]) -> list[Tensor]:
    """Per member ``i``: the samples it trains with SAM — the other members' flattest sets, plus its own share
    (every ``M``-th, from position ``i``) of the samples no member counts among its flattest."""
    claimed = torch.stack(flat).any(0)
    unclaimed = torch.nonzero(~claimed).flatten()
    out = []
    for i in range(len(flat)):
        others = torch.stack([f for j, f in enumerate(flat) if j != i]).any(0)
        share = torch.zeros_like(claimed)
        share[unclaimed[i :: len(flat)]] = True
        out.append(others | share)
    return out


@register_method("sharpbalance")
@dataclass
class SharpBalance(Method):
    """SAM on the samples the other members find flattest, plain SGD on the rest (after ``balance_from``)."""

    description = "SharpBalance: each member of an Ensemble takes SAM steps on the other members' flattest samples"

    rho: Annotated[float, Field(gt=0.0)] = 0.05
    flat_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    balance_from: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # fraction of the epochs trained with SAM on all

    def __post_init__(self) -> None:
        super().__post_init__()
        self._balanced = self.balance_from == 0.0
        self._steps: list[SharpnessStep] = []
        self._sgd_grads: list[tuple[nn.Parameter, Tensor]] = []

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        self._steps = [SharpnessStep(self.rho) for _ in members_of(model, "sharpbalance")]
        return {}

    def schedule(self, model: nn.Module, epoch: int, epochs: int) -> bool:
        self._balanced = epoch >= self.balance_from * epochs
        return False

    def resume(self, model: nn.Module, epoch: int, epochs: int) -> None:
        self.schedule(model, epoch, epochs)

    def sam_masks(self, members: nn.ModuleList, x: Tensor, y: Tensor) -> list[Tensor]:
        """Which samples of the batch each member trains with SAM."""
        if not self._balanced:
            return [torch.ones_like(y, dtype=torch.bool) for _ in members]
        return sam_sets([flattest(per_sample_sharpness(m, x, y), self.flat_ratio) for m in members])

    def objective(self, model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        members = members_of(model, "sharpbalance")
        if len(self._steps) != len(members):
            self.prepare(model)
        self._sgd_grads = []
        loss = x.new_zeros(())
        for member, step, sam in zip(members, self._steps, self.sam_masks(members, x, y), strict=True):
            params = [p for p in member.parameters() if p.requires_grad]
            if (~sam).any():  # the SGD part: its gradient at theta, added back after the SAM part's backward
                part = nn.functional.cross_entropy(member(x[~sam]), y[~sam], reduction="sum") / len(y)
                grads = torch.autograd.grad(part / len(members), params, allow_unused=True)
                self._sgd_grads += [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
                loss = loss + part.detach() / len(members)
            if sam.any():  # the SAM part: move to theta + eps, the loop back-propagates the loss there
                step.ascend(params, nn.functional.cross_entropy(member(x[sam]), y[sam]))
                part = nn.functional.cross_entropy(member(x[sam]), y[sam], reduction="sum") / len(y)
                loss = loss + part / len(members)
        return loss

    def after_backward(self, model: nn.Module) -> bool:
        for step in self._steps:
            step.descend_back()
        pairs = self._sgd_grads
        if distributed.world().size > 1:  # data-parallel: every rank adds the ranks' batch-weighted SGD parts
            local = {id(p): g for p, g in pairs}
            params = [p for m in members_of(model, "sharpbalance") for p in m.parameters() if p.requires_grad]
            pairs = list(
                zip(params, distributed.average([local.get(id(p), torch.zeros_like(p)) for p in params]), strict=True)
            )
        for p, g in pairs:
            p.grad = g.clone() if p.grad is None else p.grad + g
        self._sgd_grads = []
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"_balanced": self._balanced}
