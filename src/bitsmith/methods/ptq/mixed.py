"""Mixed-precision PTQ (HAWQ-v2/v3 style): per-layer sensitivity, integer-program bit allocation.

Spec: ``shared/methods/mixed-precision.md`` and ``fisher-aware.md``. On the calibration data, each
selected layer gets a weight sensitivity ``S_l`` (``hessian``: Hutchinson trace / n_l; ``eigen``: top
Hessian eigenvalue; ``fisher``: empirical Fisher trace / n_l; ``error``: 1), and each candidate
bit-width the perturbation ``S_l * ||Q_b(W_l) - W_l||^2`` with the method's own weight quantizer.
``loss`` uses the spec's other direct proxy instead: the measured increase of the calibration loss
when only layer ``l`` is quantized at ``b`` bits (one forward pass per layer and candidate).
With ``a_candidates`` the activations are allocated too: ``S^a_l`` is the same measure taken in the
layer's input on the calibration batch and the perturbation ``S^a_l * ||Q_a(x_l) - x_l||^2``, so each
layer picks a (weight bits, activation bits) pair.

``scipy.optimize.milp`` minimises the summed perturbation under the budgets: ``avg_bits`` (average
weight bits over the selected layers, i.e. their weight size) and/or ``bops`` (bit operations
``MACs * w_bits * a_bits`` relative to the same layers at W8A8, HAWQ-v3). The solved ``allocation``
(``{layer: {w_bits, a_bits}}``) is part of the method's config, so the resolved recipe re-runs without
re-solving. Then the layers are quantized like ``ptq`` at their widths.

Critical classes (Fisher-aware quantization): with ``critical``, the loss whose curvature is measured
is ``L_F + critical_weight * L_A``, ``L_A`` the cross-entropy with the non-critical classes merged
into one (``bitsmith.critical``).

A user's per-layer ``w_bits`` / ``a_bits`` in ``where.overrides`` are fixed choices: that layer's only
candidate in the integer program (its size and BOPs still count against the budgets).

Negative sensitivities: a Hutchinson trace (or top eigenvalue) can come out negative where the loss is
locally non-convex or the estimate is noisy. Such a layer's sensitivity is taken as 0 (quantizing it
is predicted not to raise the loss to second order, so it gets the fewest bits the budget allows) and a
warning names it; the measured values stay in ``sensitivities``.

Labels: the calibration batches' labels when they carry them, otherwise the float model's own
predictions (stated deviation: label-free calibration). A causal LM (``...ForCausalLM``) is scored on
its own objective instead: the next token of the calibration text, the loss of one example being the mean
over its tokens. ``sensitivity_batches`` limits the sensitivity pass to the first calibration batches
(a 135M-parameter LM's double backward over 32 windows of 512 tokens does not fit a small machine).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.alloc import Budget, allocate
from bitsmith.critical import critical_loss
from bitsmith.data import concat_batches, drop_padding, first_example, real_tokens
from bitsmith.eval.cost import measure_macs
from bitsmith.method import eval_mode, output_logits, register_method, run_forward
from bitsmith.methods.ptq.ptq import PTQ
from bitsmith.quant.layers import attach, observe_inputs
from bitsmith.sensitivity import Target, captured_inputs, fisher_traces, hutchinson_traces, top_eigenvalues

Bits = Annotated[int, Field(ge=1, le=16)]
FISHER_EXAMPLES = 128  # per-example weight gradients are one backward each


@register_method("mixed")
@dataclass
class MixedPrecision(PTQ):
    """PTQ with per-layer bits from a sensitivity-weighted integer program under size / BOPs budgets."""

    description = "mixed-precision PTQ: Hessian / Fisher / error sensitivity, HiGHS integer-program bit allocation"

    sensitivity: Literal["hessian", "eigen", "fisher", "error", "loss"] = "hessian"
    candidates: list[Bits] = field(default_factory=lambda: [2, 3, 4, 6, 8])
    a_candidates: list[Bits] | None = None
    avg_bits: Annotated[float, Field(gt=0.0, le=16.0)] | None = 4.0
    bops: Annotated[float, Field(gt=0.0)] | None = None
    critical: list[Annotated[int, Field(ge=0)]] | None = None
    critical_weight: Annotated[float, Field(ge=0.0)] = 1.0
    allocation: dict[str, dict[Literal["w_bits", "a_bits"], Bits]] | None = None
    max_probes: Annotated[int, Field(ge=4)] = 64
    sensitivity_batches: Annotated[int, Field(ge=1)] | None = None  # None: every calibration batch
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.avg_bits is None and self.bops is None and self.allocation is None:
            raise ValueError("mixed: set a budget, avg_bits (weight size) and/or bops (relative to W8A8)")
        if self.bops is not None and self.a_bits is None and not self.a_candidates:
            raise ValueError("mixed: a BOPs budget needs quantized activations (a_bits or a_candidates)")

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        self._overrides = self.where.resolve(model)
        self._layers = list(self._overrides)
        return {}

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        batches = list(batches)
        if self.allocation is None:
            self.allocation = self.solve(model, batches)
        allocation = self.allocation

        def weight_q(name: str, layer: nn.Module, overrides: dict[str, Any]) -> Any:
            return self._weight_q(name, layer, {**overrides, **allocation[name]})

        def input_q(name: str, layer: nn.Module, overrides: dict[str, Any]) -> Any:
            return self._input_q(name, layer, {**overrides, **allocation[name]})

        where = type(self.where)(include=self._layers, types=self.where.types, overrides=self.where.overrides)
        attach(model, where, weight_q, input_q)
        observe_inputs(model, self._layers, batches)

    # -- sensitivities ----------------------------------------------------------------------------
    def _inputs_and_labels(self, model: nn.Module, batch: Any) -> tuple[Any, Tensor]:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._next_token = type(model).__name__.endswith("ForCausalLM")
        if self._next_token:
            return inputs, inputs["input_ids"][:, 1:]
        if isinstance(batch, (tuple, list)):
            return inputs, batch[1]
        with torch.no_grad():
            return inputs, output_logits(run_forward(model, inputs)).argmax(-1)

    def measure(self, model: nn.Module, batch: Any, target: Target = "weight") -> dict[str, float]:
        """``S_l`` per selected layer, in its weight or its input (1 for ``error``)."""
        if self.sensitivity in ("error", "loss"):
            return dict.fromkeys(self._layers, 1.0)
        with eval_mode(model):
            inputs, labels = self._inputs_and_labels(model, batch)

            def loss(m: nn.Module, n: int | None = None, reduction: str = "mean") -> Tensor:
                logits = output_logits(run_forward(m, inputs if n is None else _first(inputs, n)))
                return self.calibration_loss(logits, labels if n is None else labels[:n], reduction)

            if self.sensitivity == "hessian":
                return hutchinson_traces(model, loss, self._layers, self.max_probes, seed=self.seed, target=target)
            if self.sensitivity == "eigen":
                return top_eigenvalues(model, loss, self._layers, seed=self.seed, target=target)
            n = FISHER_EXAMPLES if target == "weight" else None
            return fisher_traces(model, lambda m: loss(m, n, "none"), self._layers, target=target)

    def calibration_loss(self, logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        """``L_F`` (cross-entropy), plus ``critical_weight * L_A`` with critical classes; for a causal LM the
        next-token cross-entropy, per example the mean over its tokens."""
        if getattr(self, "_next_token", False):
            tokens = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
            return tokens.mean() if reduction == "mean" else tokens.mean(dim=1)
        loss = nn.functional.cross_entropy(logits, labels, reduction=reduction)
        if self.critical:
            loss = loss + self.critical_weight * critical_loss(logits, labels, self.critical, reduction)
        return loss

    # -- the integer program ----------------------------------------------------------------------
    def solve(self, model: nn.Module, batches: list[Any]) -> dict[str, dict[str, int]]:
        """Measure the sensitivities, then the integer program over the candidate (w, a) pairs."""
        batch = concat_batches(batches[: self.sensitivity_batches])
        w_cost, a_cost = self.perturbations(model, batch)
        cost = {
            name: {(w, a): w_cost[name][w] + a_cost[name].get(a, 0.0) for w, a in self._choices(name)}
            for name in self._layers
        }
        numel = {name: model.get_submodule(name).weight.numel() for name in self._layers}
        budgets = []
        if self.avg_bits is not None:
            size = {name: {(w, a): float(numel[name] * w) for w, a in cost[name]} for name in self._layers}
            budgets.append(Budget("model size (weight bits)", size, self.avg_bits * sum(numel.values())))
        if self.bops is not None:
            macs = measure_macs(model, first_example(batch), self._layers)
            use = {name: {(w, a): float(macs[name] * w * a) for w, a in cost[name]} for name in self._layers}
            budgets.append(Budget("BOPs", use, self.bops * 64 * sum(macs.values())))
        picked = allocate(cost, budgets)
        return {name: _bits_entry(w, a) for name, (w, a) in picked.items()}

    def _choices(self, name: str) -> list[tuple[int, int | None]]:
        """The (weight bits, activation bits) pairs layer ``name`` may take: a user's override is fixed."""
        fixed = self._overrides[name]
        weights = [fixed["w_bits"]] if "w_bits" in fixed else self.candidates
        inputs = [fixed["a_bits"]] if "a_bits" in fixed else (self.a_candidates or [self.a_bits])
        return [(w, a) for w in weights for a in inputs]

    def _nonnegative(self, measured: dict[str, float], what: str) -> dict[str, float]:
        """Sensitivities with negative values taken as 0, and a warning naming those layers."""
        negative = {name: value for name, value in measured.items() if value < 0}
        if negative:
            listed = ", ".join(f"{name} ({value:.3g})" for name, value in list(negative.items())[:5])
            warnings.warn(
                f"mixed: negative {self.sensitivity} {what} sensitivity for {listed}: the loss is locally non-convex "
                "there or the estimate is noisy; taken as 0 (fewest bits). Raise max_probes or calibrate on more data",
                stacklevel=3,
            )
        return {name: max(value, 0.0) for name, value in measured.items()}

    def perturbations(self, model: nn.Module, batch: Any) -> tuple[PerLayer, PerLayer]:
        """``Omega_l(b)`` for the weight and (with ``a_candidates``) the input of every layer."""
        w_q = {name: self._weight_quantizers(model, name) for name in self._layers}
        a_q = self._input_quantizers(model, batch) if self.a_candidates else {n: {} for n in self._layers}
        if self.sensitivity == "loss":
            with eval_mode(model):
                return self._loss_increase(model, batch, w_q, a_q)
        self.sensitivities = self.measure(model, batch)
        weight_s = self._nonnegative(self.sensitivities, "weight")
        w_cost = {
            name: {b: weight_s[name] * _error(q, model.get_submodule(name).weight) for b, q in qs.items()}
            for name, qs in w_q.items()
        }
        if not self.a_candidates:
            return w_cost, {name: {} for name in self._layers}
        self.input_sensitivities = self.measure(model, batch, target="input")
        input_s = self._nonnegative(self.input_sensitivities, "input")
        a_cost = {
            name: {b: input_s[name] * _error(q, self._inputs[name]) for b, q in qs.items()} for name, qs in a_q.items()
        }
        return w_cost, a_cost

    def _weight_quantizers(self, model: nn.Module, name: str) -> dict[int, Any]:
        """Weight quantizers per candidate, calibrated on the layer's weight."""
        layer = model.get_submodule(name)
        bits = sorted({w for w, _ in self._choices(name)})
        return {b: self._weight_q(name, layer, {**self._overrides[name], "w_bits": b}) for b in bits}

    def _input_quantizers(self, model: nn.Module, batch: Any) -> dict[str, dict[int, Any]]:
        """Activation quantizers per candidate, calibrated on each layer's inputs from the batch."""
        with torch.no_grad(), eval_mode(model), captured_inputs(model, self._layers) as inputs, real_tokens(batch):
            run_forward(model, batch)
            # dropped after run_forward returned, so this block holds the batch's padding context itself
            self._inputs = {name: drop_padding(x.detach()) for name, x in inputs.items()}
        return {
            name: {
                a: self._input_q(name, model.get_submodule(name), {**self._overrides[name], "a_bits": a}).calibrate_(x)
                for a in sorted({a for _, a in self._choices(name)})
            }
            for name, x in self._inputs.items()
        }

    @torch.no_grad()
    def _loss_increase(
        self, model: nn.Module, batch: Any, w_q: dict[str, dict[int, Any]], a_q: dict[str, dict[int, Any]]
    ) -> tuple[PerLayer, PerLayer]:
        """The measured loss increase when only layer ``l``'s weight (or input) is quantized at ``b``."""
        inputs, labels = self._inputs_and_labels(model, batch)

        def loss() -> float:
            return float(self.calibration_loss(output_logits(run_forward(model, inputs)), labels))

        base = loss()
        w_cost: PerLayer = {}
        a_cost: PerLayer = {}
        for name in self._layers:
            layer = model.get_submodule(name)
            original = layer.weight.detach().clone()
            w_cost[name] = {}
            for bits, q in w_q[name].items():
                layer.weight.copy_(q(original))
                w_cost[name][bits] = loss() - base
            layer.weight.copy_(original)
            a_cost[name] = {}
            for bits, q in a_q[name].items():
                handle = layer.register_forward_pre_hook(lambda m, args, q=q: (q(args[0]), *args[1:]))
                a_cost[name][bits] = loss() - base
                handle.remove()
        return w_cost, a_cost


PerLayer = dict[str, dict[int, float]]


def _error(q: Any, x: Tensor) -> float:
    """``||Q(x) - x||^2``."""
    with torch.no_grad():
        return float((q(x) - x).pow(2).sum())


def _first(inputs: Any, n: int) -> Any:
    """The first ``n`` examples of a tensor or a dict of tensors."""
    return {k: v[:n] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:n]


def _bits_entry(w_bits: int, a_bits: int | None) -> dict[str, int]:
    return {"w_bits": w_bits} if a_bits is None else {"w_bits": w_bits, "a_bits": a_bits}
