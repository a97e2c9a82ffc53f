"""NoisyQuant (Liu et al., CVPR 2023): a fixed noisy bias before the activation quantizer.

Spec: ``shared/methods/noisyquant.md``. Runs on top of any method that gives the selected Linear layers
an activation quantizer (list it after, e.g. ``[ptq, noisyquant]`` or ``[smoothquant, ptq, noisyquant]``).
One forward pass over the calibration set visits the layers in network order (later layers see the
already-quantized, already-noised upstream); for each layer, on its input ``X`` and quantized weight
``W``, minimising the layer-output error ``mean(((Q'(X) - X) W^T)^2)``:

1. clip search (uniform per-tensor quantizers): the range ``[min X, max X] * t``, ``t`` in (0, 1];
2. mean shift: ``N = mu``, ``mu`` in ``[-step, step)``;
3. noise amplitude: ``N = mu + k * step * u``, ``u ~ U(-1/2, 1/2)`` per input channel from ``seed``,
   ``k`` in ``[0, noise_range)``; ``k = 0`` (no noise) stays when nothing helps.

The layer then computes ``W Q(X + N) + (b - W N)``: ``finalize`` folds ``-W N`` into the bias.

Deviations from the paper / official code, stated:
* Searches are two-stage grids (``grid`` points, then ``grid`` points between the best one's
  neighbours) instead of the code's 1000 / 400 / 2000 exhaustive candidates, and the output error is
  measured on ``rows`` random rows (tokens) of ``X`` and ``out_channels`` random outputs (the same for
  every candidate) — about the same resolution at a small fraction of the cost on 2 cores.
* The calibration set is concatenated into one batch (the code uses one batch of 256 images).
* ``noise: code-gaussian`` is the official code's variant, ``nu = (2 eps - 1) * step``, ``eps ~ N(0, 1)``
  (mean ``-step``, std ``2 step``, not uniform); the paper's uniform noise is the default.
* The clip search applies to static per-tensor uniform quantizers; other quantizers (codebook,
  per-channel) keep their range and get the mean shift and noise only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.data import concat_batches, drop_padding
from bitsmith.method import Method, eval_mode, register_method, run_forward
from bitsmith.nn import QLinear
from bitsmith.quant.base import Quantizer
from bitsmith.quant.functional import fake_quant, params_from_range
from bitsmith.quant.noisy import NoisyBias
from bitsmith.quant.uniform import UniformQuantizer

Objective = Callable[[float], float]


def grid_search(objective: Objective, lo: float, hi: float, points: int, keep: float | None = None) -> float:
    """Minimise ``objective`` on ``points`` values in ``[lo, hi]``, then ``points`` values between the
    best one's neighbours; ``keep`` (evaluated first) wins ties, so a search never makes things worse."""
    best_x = keep
    best = objective(keep) if keep is not None else math.inf
    step = (hi - lo) / max(points - 1, 1)
    for lo_, hi_ in ((lo, hi), (None, None)):
        if lo_ is None:
            assert best_x is not None
            lo_, hi_ = max(lo, best_x - step), min(hi, best_x + step)
        for x in torch.linspace(lo_, hi_, points).tolist():
            value = objective(x)
            if value < best:
                best, best_x = value, x
    assert best_x is not None
    return best_x


def quantizer_step(q: Quantizer) -> float:
    """The (mean) distance between adjacent levels of an activation quantizer."""
    inner = q.inner if isinstance(q, NoisyBias) else q
    if isinstance(inner, UniformQuantizer) and inner.scale.numel():
        return float(inner.scale.detach().float().mean())
    levels = getattr(inner, "levels", None)
    if isinstance(levels, Tensor) and levels.numel() > 1:
        return float(levels.detach().float().diff().mean())
    raise ValueError(f"noisyquant cannot find the step of a {type(inner).__name__}; calibrate it first")


def base_noise(kind: str, channels: int, seed: int) -> Tensor:
    """The fixed per-channel base noise ``u`` (in units of the quantization step)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "code-gaussian":
        return 2 * torch.randn(channels, generator=generator) - 1
    return torch.rand(channels, generator=generator) - 0.5


@register_method("noisyquant")
@dataclass
class NoisyQuant(Method):
    """Clip search, mean shift and a fixed noisy bias per layer; after a method that quantizes activations."""

    description = "NoisyQuant: output-error clip search, mean shift and a fixed noisy bias before activation quant"

    clip_search: bool = True
    mean_shift: bool = True
    noise: Literal["uniform", "code-gaussian", "none"] = "uniform"
    noise_range: Annotated[float, Field(gt=0.0)] = 2.0
    grid: Annotated[int, Field(ge=3, le=1000)] = 16
    rows: Annotated[int, Field(ge=16)] = 512
    out_channels: Annotated[int, Field(ge=1)] = 128
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._layers: list[str] = []
        self.report: dict[str, dict[str, float]] = {}

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        selected = self.where.resolve(model)
        self._layers = [
            n for n in selected if isinstance(model.get_submodule(n), QLinear) and model.get_submodule(n).input_q
        ]
        if not self._layers:
            raise ValueError(
                "noisyquant found no Linear layer with an activation quantizer; list a method that quantizes "
                "activations before it, e.g. methods: [{name: ptq, a_bits: 6}, {name: noisyquant}]"
            )
        for name in self._layers:
            q = model.get_submodule(name).input_q
            if isinstance(q, UniformQuantizer) and (q.dynamic or q.granularity != "tensor"):
                kind = "dynamic" if q.dynamic else "static"
                raise ValueError(
                    f"noisyquant needs a static per-tensor activation quantizer (one fixed step for the noise and "
                    f"the mean shift); layer {name!r} has a {kind} per-{q.granularity} one. Use a_granularity: "
                    "tensor and a_dynamic: false in the method before it, or exclude the layer"
                )
        return {}

    @torch.no_grad()
    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        batch = concat_batches(list(batches))
        handles = [
            model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: self._search(n, m, a[0]))
            for n in self._layers
        ]
        try:
            with eval_mode(model):
                run_forward(model, batch)
        finally:
            for handle in handles:
                handle.remove()

    def _search(self, name: str, layer: QLinear, x: Tensor) -> None:
        """Set the clip, mean and noise of ``layer``'s input quantizer from its input ``x``."""
        index = self._layers.index(name)
        rows = drop_padding(x.detach()).reshape(-1, x.shape[-1]).float()
        if layer.smooth is not None:
            rows = rows / layer.smooth
        full_range = (float(rows.min()), float(rows.max()))  # clip candidates span all rows, not the subsample
        generator = torch.Generator().manual_seed(self.seed * 7919 + index)
        if rows.shape[0] > self.rows:
            rows = rows[torch.randint(rows.shape[0], (self.rows,), generator=generator)]
        weight = layer.effective_weight().detach().float()
        if weight.shape[0] > self.out_channels:  # the same random outputs for every candidate
            weight = weight[torch.randperm(weight.shape[0], generator=generator)[: self.out_channels]]
        quantizer = layer.input_q.inner if isinstance(layer.input_q, NoisyBias) else layer.input_q
        assert quantizer is not None
        reference = rows @ weight.T

        def error(quantize: Callable[[Tensor], Tensor], noise: Tensor | float = 0.0) -> float:
            return float(((quantize(rows + noise) - noise) @ weight.T - reference).pow(2).mean())

        record: dict[str, float] = {"mse_ptq": error(quantizer)}
        if self.clip_search and _searchable(quantizer):
            self._clip(quantizer, full_range, error)
        record["mse_clip"] = error(quantizer)
        step = quantizer_step(quantizer)
        mu = 0.0
        if self.mean_shift:
            mu = grid_search(lambda m: error(quantizer, m * step), -1.0, 1.0, self.grid, keep=0.0) * step
        record["mse_mean"] = error(quantizer, mu)
        k = 0.0
        if self.noise != "none":
            u = base_noise(self.noise, rows.shape[1], self.seed * 7919 + index) * step
            k = grid_search(lambda a: error(quantizer, mu + a * u), 0.0, self.noise_range, self.grid, keep=0.0)
            noise = mu + k * u
        else:
            noise = torch.full((rows.shape[1],), mu)
        record.update({"mse_noise": error(quantizer, noise), "mu_steps": mu / step, "k": k, "step": step})
        self.report[name] = record
        if float(noise.abs().max()) > 0:
            wrapper = NoisyBias(quantizer, rows.shape[1])
            wrapper.noise = noise.to(layer.weight.dtype)
            layer.input_q = wrapper
        else:
            layer.input_q = quantizer

    def _clip(self, quantizer: UniformQuantizer, full_range: tuple[float, float], error: Callable[..., float]) -> None:
        """Output-error search of the clipping range ``[min, max] * t`` of the whole calibration input; the
        current range is kept on ties."""
        lo, hi = full_range
        if quantizer.symmetric:
            lo, hi = -max(abs(lo), abs(hi)), max(abs(lo), abs(hi))
        qmin, qmax = quantizer.qmin, quantizer.qmax

        def clipped(t: float) -> float:
            scale, zp = params_from_range(
                torch.tensor([lo * t]), torch.tensor([hi * t]), qmin, qmax, quantizer.symmetric
            )
            return error(lambda v: fake_quant(v, scale, zp, qmin, qmax))

        t = grid_search(clipped, 1.0 / self.grid, 1.0, self.grid)
        if clipped(t) < error(quantizer):
            quantizer.set_range(torch.tensor([lo * t]), torch.tensor([hi * t]))

    def finalize(self, model: nn.Module) -> None:
        for name in self._layers:
            layer = model.get_submodule(name)
            if isinstance(layer.input_q, NoisyBias):
                layer.input_q.fold_into(layer)


def _searchable(q: Quantizer) -> bool:
    return isinstance(q, UniformQuantizer) and q.granularity == "tensor" and not q.dynamic and q.scale.numel() == 1
