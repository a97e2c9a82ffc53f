"""Ensembles: several classifiers averaged in probability space, saved and loaded as one checkpoint.

:class:`Ensemble` returns the log of its members' mean softmax (DVERGE's ensemble prediction), so top-1,
cross-entropy and every attack treat it as one classifier. Each member is an ordinary module under
``members.<i>``: a method's selection can compress one member differently from another
(``where: {include: ["members.0.*"]}``). The ``ensemble`` method (``methods/ensembles/deep_ensemble.py``) trains the
members independently; DVERGE, SharpBalance and HCE train them together with their own objectives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Ensemble(nn.Module):
    """Members averaged in probability space. ``example`` (one input batch) is run through every member at
    construction: members that refuse it, or disagree on the output shape, are refused with their index."""

    def __init__(self, members: Sequence[nn.Module], example: Tensor) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        shapes = []
        with torch.no_grad():
            for i, member in enumerate(members):
                was = member.training
                member.eval()
                try:
                    shapes.append(tuple(member(example).shape))
                except (RuntimeError, ValueError, TypeError) as exc:
                    raise ValueError(f"ensemble member {i} does not accept inputs of shape {tuple(example.shape)}: "
                                     f"{str(exc).splitlines()[0][:200]}") from None  # fmt: skip
                finally:
                    member.train(was)
        for i, shape in enumerate(shapes):
            if shape != shapes[0]:
                raise ValueError(f"ensemble member {i} outputs shape {shape}, member 0 outputs {shapes[0]}: members "
                                 "must share their input and output shapes")  # fmt: skip
        self.members = nn.ModuleList(members)

    def member_logits(self, x: Tensor) -> Tensor:
        """``(members, batch, classes)`` logits."""
        return torch.stack([member(x) for member in self.members])

    def forward(self, x: Tensor) -> Tensor:
        return combine(self.member_logits(x))


def combine(member_logits: Tensor) -> Tensor:
    """Log of the members' mean softmax, from their ``(members, batch, classes)`` logits."""
    log_probs = torch.log_softmax(member_logits, dim=-1)
    return torch.logsumexp(log_probs, dim=0) - math.log(len(member_logits))


def members_of(model: nn.Module, method: str) -> nn.ModuleList:
    """The members of an :class:`Ensemble`, or a clear error naming ``method``."""
    if not isinstance(model, Ensemble):
        raise ValueError(f"{method} trains an ensemble: build the model as bitsmith.Ensemble([m1, m2, ...], example)")
    return model.members
