"""NViT (Yang et al., CVPR 2023): global structural pruning of a vision transformer with a Hessian-aware
saliency, iterated with training until a cost target is met; pruned structures are removed for real.

Spec: ``shared/methods/nvit.md`` (code: NVlabs/NViT). Units (``bitsmith.structure``): embedding
dimensions, heads, per-head QK and V dimensions, MLP neurons. The saliency of unit ``S`` is the
second-order Taylor estimate with the empirical Fisher, ``I_S = (sum_{s in S} w_s g_s)^2`` per batch,
averaged over the ``interval`` batches between pruning steps and smoothed across steps by an EMA
(``momentum`` 0.9); the embedding criterion is divided by the depth and the QK criterion by 2, as in
the code. Every ``interval`` training steps (the ``after_backward`` hook) the ``per_step``
lowest-scoring units over all structures and blocks are removed, each structure keeping at least
``min_units``, until the model's MACs are at most ``macs_target`` of the original; training then
fine-tunes the smaller model. Without training, ``finalize`` prunes to the target in one shot from
the calibration gradients.

Baselines (``criterion``): ``magnitude`` (the same global loop ranking units by ``sum w^2``) and
``uniform`` width scaling (every block keeps the same fraction of embedding, QK, V and MLP units,
chosen by magnitude, pruned once before training).

Deviations, stated: with ``tie_qk_v`` (default) a QK dimension is pruned together with the same V
dimension (their scores summed): PyTorch's fused CPU attention kernel needs equal QK and V widths,
and with unequal ones it falls back to a kernel that made the pruned ViT slower than the original
(measured: 1.7x slower at QK 12 / V 8 than at 12 / 12). The cost term is MACs from the architecture instead of a GPU latency LUT
(``score = I_S / mean(I) - eta * dMACs_S / mean(dMACs)``, ``eta`` 0 by default); training between
and after pruning steps is plain cross-entropy (no distillation from the full model); the
embedding units' LayerNorms are sliced with them (statistics over the kept dimensions).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.method import Method, register_method, run_forward
from bitsmith.structure import EMB, Key, check_vit, dims, macs, remove_units, unit_sums

Kind = Literal["emb", "heads", "qk", "v", "mlp"]
MIN_UNITS = {"emb": 16, "heads": 1, "qk": 4, "v": 4, "mlp": 16}


@register_method("nvit")
@dataclass
class NViT(Method):
    """Iterative global structural pruning of a ViT by Hessian-aware (Taylor) saliency to a MACs target."""

    description = (
        "NViT: Hessian-aware global structural ViT pruning (heads, QK/V dims, MLP, embedding) to a MACs target"
    )

    macs_target: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    criterion: Literal["taylor", "magnitude", "uniform"] = "taylor"
    per_step: Annotated[int, Field(ge=1)] = 16
    interval: Annotated[int, Field(ge=1)] = 50
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    eta: Annotated[float, Field(ge=0.0)] = 0.0
    structures: list[Kind] = field(default_factory=lambda: ["emb", "heads", "qk", "v", "mlp"])
    min_units: dict[str, int] = field(default_factory=lambda: dict(MIN_UNITS))
    tie_qk_v: bool = True

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        check_vit(model)
        self._full_macs = macs(model)
        self._ema: dict[Key, Tensor] | None = None
        self._sum: dict[Key, Tensor] = {}
        self._batches = 0
        self._done = False
        if self.criterion == "uniform":
            self.prune_uniform(model)
        return {}

    @property
    def done(self) -> bool:
        return self._done

    # -- scores -------------------------------------------------------------------------------
    def _accumulate(self, model: nn.Module) -> None:
        """Add this batch's ``(sum w g)^2`` per unit (Taylor) to the running sum."""
        if self.criterion == "taylor":
            sums = unit_sums(model, lambda p: p * p.grad if p.grad is not None else torch.zeros_like(p))
            for key, value in sums.items():
                self._sum[key] = self._sum.get(key, 0) + value.pow(2)
        self._batches += 1

    def _update_scores(self, model: nn.Module) -> None:
        if self.criterion == "taylor":
            fresh = {key: total / self._batches for key, total in self._sum.items()}
            fresh[EMB] = fresh[EMB] / len(model.blocks)
            fresh |= {key: value / 2 for key, value in fresh.items() if key[0] == "qk"}
        else:
            fresh = unit_sums(model, lambda p: p.pow(2))
        stale = self._ema is None or any(self._ema[k].shape != v.shape for k, v in fresh.items())
        if stale or self.momentum == 0:  # (stale: a resumed run's model was pruned after these scores)
            self._ema = fresh
        else:
            self._ema = {k: self.momentum * self._ema[k] + (1 - self.momentum) * fresh[k] for k in fresh}
        self._sum, self._batches = {}, 0

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        """Taylor scores from calibration gradients (labels, or the model's own predictions)."""
        if self._done or self.criterion != "taylor":
            return
        for batch in batches:
            model.zero_grad(set_to_none=True)
            logits = run_forward(model, batch)
            labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else logits.argmax(-1).detach()
            nn.functional.cross_entropy(logits, labels).backward()
            self._accumulate(model)
        model.zero_grad(set_to_none=True)
        if self._batches:
            self._update_scores(model)

    # -- pruning ------------------------------------------------------------------------------
    def after_backward(self, model: nn.Module) -> bool:
        self._done = self._done or macs(model) <= self.macs_target * self._full_macs  # (also after a resume)
        if self._done or self.criterion == "uniform":
            return False
        self._accumulate(model)
        if self._batches < self.interval:
            return False
        self._update_scores(model)
        self.prune_step(model, self.per_step)
        return True

    def _keys(self, counts: dict[Key, int]) -> list[Key]:
        kinds = set(self.structures) - ({"v"} if self.tie_qk_v else set())
        return [key for key in counts if key[0] in kinds]

    def _with_v(self, key: Key) -> list[Key]:
        """The structures a unit of ``key`` removes: with ``tie_qk_v``, a QK dimension takes its V dimension."""
        return [key, ("v", key[1])] if self.tie_qk_v and key[0] == "qk" else [key]

    def _ranked(self, model: nn.Module) -> list[tuple[float, Key, int]]:
        """Every prunable unit as (score, structure, index), lowest score first."""
        assert self._ema is not None
        counts = dims(model)
        keys = self._keys(counts)
        saving = {key: macs(model, counts) - macs(model, {**counts, **{k: counts[k] - 1 for k in self._with_v(key)}})
                  for key in keys}  # fmt: skip
        scores = {key: sum(self._ema[k] for k in self._with_v(key)) for key in keys}
        mean_score = torch.cat(list(scores.values())).mean().clamp(min=1e-30)
        mean_saving = sum(saving[k] * counts[k] for k in keys) / sum(counts[k] for k in keys)
        ranked = []
        for key in keys:
            score = scores[key] / mean_score - self.eta * saving[key] / mean_saving
            ranked += [(float(s), key, i) for i, s in enumerate(score)]
        return sorted(ranked, key=lambda item: item[0])

    def prune_step(self, model: nn.Module, count: int | None) -> None:
        """Remove up to ``count`` (None: any number of) lowest-scoring units, stopping at the MACs target."""
        if self._ema is None and self.criterion == "magnitude":
            self._update_scores(model)
        if self._ema is None:
            raise ValueError("nvit has no saliency yet: give it calibration data or train with it before finalize")
        counts = dims(model)
        keep = {key: torch.ones(n, dtype=torch.bool) for key, n in counts.items()}
        removed = 0
        for _, key, index in self._ranked(model):
            if macs(model, counts) <= self.macs_target * self._full_macs or removed == count:
                break
            if counts[key] - 1 < self.min_units.get(key[0], 1):
                continue
            for k in self._with_v(key):
                keep[k][index] = False
                counts[k] -= 1
            removed += 1
        remove_units(model, keep)
        self._ema = {key: self._ema[key][keep[key]] for key in keep}
        self._done = macs(model) <= self.macs_target * self._full_macs or removed == 0

    @torch.no_grad()
    def prune_uniform(self, model: nn.Module) -> None:
        """Keep the same fraction of each block's embedding, QK, V and MLP units (largest ``sum w^2``),
        the largest fraction whose MACs meet the target."""
        counts = dims(model)
        scalable = [key for key in counts if key[0] in self.structures and key[0] != "heads"]

        def scaled(fraction: float) -> dict[Key, int]:
            floor = {key: self.min_units.get(key[0], 1) for key in scalable}
            return {**counts, **{k: max(floor[k], math.ceil(fraction * counts[k])) for k in scalable}}

        low, high = 0.0, 1.0
        for _ in range(30):  # bisection on the width fraction
            mid = (low + high) / 2
            low, high = (mid, high) if macs(model, scaled(mid)) <= self.macs_target * self._full_macs else (low, mid)
        target = scaled(low)
        magnitude = unit_sums(model, lambda p: p.pow(2))
        keep = {}
        for key, n in target.items():
            tied = self.tie_qk_v and key[0] in ("qk", "v")
            score = magnitude[("qk", key[1])] + magnitude[("v", key[1])] if tied else magnitude[key]
            keep[key] = torch.zeros(counts[key], dtype=torch.bool)
            keep[key][score.topk(n).indices] = True
        remove_units(model, keep)
        self._done = True

    def finalize(self, model: nn.Module) -> None:
        if not self._done:
            self.prune_step(model, None)
