"""BRECQ block reconstruction with AdaRound weight rounding and LSQ activation steps (Li et al., ICLR 2021;
Nagel et al., ICML 2020), generic: any model, its reconstruction units chosen by ``blocks`` (module-name globs).

Spec: ``shared/methods/q-diffusion.md`` (the reconstruction Q-Diffusion builds on) and the official BRECQ /
Q-Diffusion code. Weights: per-channel asymmetric min-max (``w_symmetric: false``), then for every unit the
rounding is learned (``bitsmith.reconstruct``) and written into the weights; activations: observed like ``ptq``,
their steps learned in the same pass. Layers outside every named block are reconstructed one by one.

Deviations, stated: by default one pass learns the rounding and the activation steps together for ``iters``
iterations (BRECQ: 20,000 for the weights with float activations, then 5,000 for the activations; ``a_iters``
selects those two passes; bitsmith's default 1,000 fits a CPU); the activation steps are learned with Adam on the
LSQ gradient without LSQ's gradient scaling.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field
from torch import nn

from bitsmith.method import register_method
from bitsmith.methods.ptq.ptq import PTQ
from bitsmith.quant.layers import observe_inputs
from bitsmith.reconstruct import ReconstructionConfig, reconstruct


@register_method("brecq")
@dataclass
class BRECQ(PTQ):
    """PTQ whose weight rounding and activation steps are learned block by block against the float model."""

    description = "BRECQ block reconstruction PTQ: AdaRound weight rounding + LSQ activation steps, any model"

    blocks: list[str] = field(default_factory=list)  # module-name globs of the reconstruction units
    w_symmetric: bool = False
    iters: Annotated[int, Field(ge=0)] = 1000
    a_iters: Annotated[int, Field(ge=1)] | None = None  # a second pass for the activation steps (official codes)
    batch_size: Annotated[int, Field(ge=1)] = 32
    lam: Annotated[float, Field(ge=0.0)] = 0.01
    warmup: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    w_lr: Annotated[float, Field(gt=0.0)] = 1e-3
    a_lr: Annotated[float, Field(gt=0.0)] = 4e-4
    p: Annotated[float, Field(gt=0.0)] = 2.4
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.w_granularity not in ("channel", "tensor"):
            raise ValueError(f"brecq: w_granularity {self.w_granularity!r}: AdaRound rounds per-channel or "
                             "per-tensor grids; choose channel or tensor")  # fmt: skip

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        batches = list(batches)
        observe_inputs(model, self._layers, batches)
        self.reconstruct_units(model, batches)

    def reconstruct_units(self, model: nn.Module, batches: list[Any]) -> None:
        """Reconstruct every unit with this method's settings; each unit's error before and after in ``_stats``."""
        cfg = ReconstructionConfig(self.iters, self.a_iters, self.batch_size, self.lam, warmup=self.warmup, w_lr=self.w_lr,
                                   a_lr=self.a_lr, p=self.p, seed=self.seed)  # fmt: skip
        self._stats = reconstruct(model, self._layers, self.blocks, batches, cfg)
