"""Mixed-precision PTQ (HAWQ-v2/v3 style): per-layer sensitivity, integer-program bit allocation.

Spec: ``shared/methods/mixed-precision.md``. On the calibration data, each selected layer gets a
sensitivity ``S_l`` (``hessian``: Hutchinson trace / n_l; ``eigen``: top Hessian eigenvalue;
``fisher``: empirical Fisher trace / n_l; ``error``: 1), and each candidate bit-width the perturbation
``S_l * ||Q_b(W_l) - W_l||^2`` (per-channel symmetric min-max ``Q_b``). ``scipy.optimize.milp`` picks
one width per layer minimising the sum under the weight-size budget ``avg_bits`` (average weight bits
over the selected layers). The solved ``allocation`` is part of the method's config, so the resolved
recipe re-runs without re-solving. Then the layers are quantized like ``ptq`` at their widths.

Labels: the loss is cross-entropy on the calibration batches' labels when they carry them, otherwise
on the float model's own predictions (stated deviation: label-free calibration).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.alloc import allocate
from bitsmith.data import concat_batches
from bitsmith.method import register_method, run_forward
from bitsmith.methods.ptq import PTQ
from bitsmith.quant.layers import attach, observe_inputs
from bitsmith.quant.uniform import UniformQuantizer
from bitsmith.sensitivity import fisher_traces, hutchinson_traces, top_eigenvalues


def quantization_error(weight: Tensor, bits: int) -> float:
    """``||Q_b(W) - W||^2`` with per-output-channel symmetric min-max scales."""
    q = UniformQuantizer(bits, True, "channel", ch_axis=0).calibrate_(weight.detach())
    with torch.no_grad():
        return float((q(weight) - weight).pow(2).sum())


@register_method("mixed")
@dataclass
class MixedPrecision(PTQ):
    """PTQ with per-layer weight bits from a sensitivity-weighted integer program under a size budget."""

    description = "mixed-precision PTQ: Hessian / Fisher / error sensitivity, HiGHS integer-program bit allocation"

    sensitivity: Literal["hessian", "eigen", "fisher", "error"] = "hessian"
    candidates: list[Annotated[int, Field(ge=1, le=16)]] = field(default_factory=lambda: [2, 3, 4, 6, 8])
    avg_bits: Annotated[float, Field(gt=0.0, le=16.0)] = 4.0
    allocation: dict[str, int] | None = None
    max_probes: Annotated[int, Field(ge=4)] = 64
    seed: int = 0

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        self._layers = list(self.where.resolve(model))
        return {}

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        batches = list(batches)
        if self.allocation is None:
            self.sensitivities = self.measure(model, batches)
            self.allocation = self.solve(model, self.sensitivities)
        allocation = self.allocation

        def weight_q(name: str, layer: nn.Module, overrides: dict[str, Any]) -> Any:
            return self._weight_q(name, layer, {**overrides, "w_bits": allocation[name]})

        where = type(self.where)(include=self._layers, types=self.where.types, overrides=self.where.overrides)
        attach(model, where, weight_q, self._input_q)
        observe_inputs(model, self._layers, batches)

    def measure(self, model: nn.Module, batches: list[Any]) -> dict[str, float]:
        """``S_l`` per selected layer."""
        if self.sensitivity == "error":
            return dict.fromkeys(self._layers, 1.0)
        batch = concat_batches(batches)
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        was_training = model.training
        model.eval()
        with torch.no_grad():
            labels = batch[1] if isinstance(batch, (tuple, list)) else run_forward(model, inputs).argmax(-1)

        def loss(m: nn.Module) -> Tensor:
            return nn.functional.cross_entropy(run_forward(m, inputs), labels)

        try:
            if self.sensitivity == "hessian":
                return hutchinson_traces(model, loss, self._layers, self.max_probes, seed=self.seed)
            if self.sensitivity == "eigen":
                return top_eigenvalues(model, loss, self._layers, seed=self.seed)
            n = min(128, inputs.shape[0])
            return fisher_traces(
                model, lambda m: nn.functional.cross_entropy(m(inputs[:n]), labels[:n], reduction="none"), self._layers
            )
        finally:
            model.train(was_training)

    def solve(self, model: nn.Module, sensitivities: dict[str, float]) -> dict[str, int]:
        """The integer program over ``candidates`` under ``avg_bits`` (weight bits of the selected layers)."""
        cost: dict[str, dict[int, float]] = {}
        size: dict[str, dict[int, float]] = {}
        for name in self._layers:
            weight = model.get_submodule(name).weight
            cost[name] = {b: abs(sensitivities[name]) * quantization_error(weight, b) for b in self.candidates}
            size[name] = {b: float(weight.numel() * b) for b in self.candidates}
        budget = self.avg_bits * sum(model.get_submodule(n).weight.numel() for n in self._layers)
        return allocate(cost, size, budget)
