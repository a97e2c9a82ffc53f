"""Split-Ensemble (Chen, Yang, Gan et al., ICML 2024): one classifier split into class-group subtasks, each with an
out-of-distribution class, on a shared trunk with one branch per subtask.

:class:`SplitEnsemble` returns, for every class, the log-probability its own branch gives it (each branch's softmax
runs over its classes *and* its OOD class), so arg-max classifies and the largest in-distribution probability over
all branches is the OOD score (low when every branch calls the input "not mine"). ``class_groups`` clusters the
classes by the class-mean features of a trained model; ``zoo.vision.split_cnn`` builds the zoo CNN's split version at
the single model's MACs. The ``split-ensemble`` method trains it (``methods/ensembles/split_ensemble.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.cluster.hierarchy import fcluster, linkage
from torch import Tensor, nn

from bitsmith.method import eval_mode


class SplitEnsemble(nn.Module):
    """A shared ``trunk`` and one branch per class group; branch ``m`` outputs ``len(groups[m]) + 1`` logits, the
    last one its out-of-distribution class."""

    def __init__(self, trunk: nn.Module, branches: Sequence[nn.Module], groups: Sequence[Sequence[int]]) -> None:
        super().__init__()
        flat = sorted(c for g in groups for c in g)
        if len(groups) < 2 or any(not g for g in groups) or flat != list(range(len(flat))):
            raise ValueError(f"split-ensemble groups must partition the classes 0..C-1 into at least 2 non-empty "
                             f"groups, got {[list(g) for g in groups]}")  # fmt: skip
        if len(branches) != len(groups):
            raise ValueError(f"{len(branches)} branches for {len(groups)} class groups: give one branch per group")
        self.groups = [list(g) for g in groups]
        self.classes = len(flat)
        self.trunk = trunk
        self.branches = nn.ModuleList(branches)

    def branch_logits(self, x: Tensor) -> list[Tensor]:
        """Each branch's ``(batch, len(group) + 1)`` logits on the shared features."""
        shared = self.trunk(x)
        return [branch(shared) for branch in self.branches]

    def forward(self, x: Tensor) -> Tensor:
        out = []
        for logits, group in zip(self.branch_logits(x), self.groups, strict=True):
            out.append((group, torch.log_softmax(logits, dim=-1)[:, : len(group)]))
        result = x.new_empty(out[0][1].shape[0], self.classes)
        for group, log_probs in out:
            result[:, group] = log_probs
        return result

    def local_targets(self, y: Tensor, branch: int) -> Tensor:
        """Branch ``branch``'s targets: a class of its group by its position there, any other class as OOD."""
        group = self.groups[branch]
        table = torch.full((self.classes,), len(group), dtype=torch.long, device=y.device)
        table[group] = torch.arange(len(group), device=y.device)
        return table[y]

    @torch.no_grad()
    def ood_score(self, x: Tensor) -> Tensor:
        """In-distribution score: the largest in-distribution probability over all branches."""
        return self(x).exp().max(dim=1).values


@torch.no_grad()
def penultimate_features(model: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """The input of ``model``'s last Linear layer for every image."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[Tensor] = []
    handle = last.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].flatten(1)))
    try:
        with eval_mode(model):
            for start in range(0, len(images), batch_size):
                model(images[start : start + batch_size])
    finally:
        handle.remove()
    return torch.cat(seen)


def class_groups(features: Tensor, labels: Tensor, groups: int) -> list[list[int]]:
    """Partition the classes into ``groups`` clusters of similar class-mean features (Ward linkage on the
    normalised means; each group sorted, groups ordered by their smallest class)."""
    classes = int(labels.max()) + 1
    if not 2 <= groups <= classes:
        raise ValueError(f"split-ensemble: {groups} groups for {classes} classes; choose 2..{classes}")
    means = torch.stack([features[labels == c].mean(0) for c in range(classes)])
    means = nn.functional.normalize(means, dim=1).double().numpy()
    cluster = fcluster(linkage(means, method="ward"), t=groups, criterion="maxclust")
    out = [sorted(int(c) for c in range(classes) if cluster[c] == k) for k in sorted(set(cluster))]
    return sorted(out, key=lambda g: g[0])
