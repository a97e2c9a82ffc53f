"""SmoothQuant (Xiao et al., ICML 2023): move activation outliers into the weights.

Spec: ``shared/methods/ptq-baselines.md``. For the Linear layers fed by one tensor ``x`` (q/k/v share
one), ``s_j = max|x_j|^alpha / max|W_j|^(1-alpha)`` per input channel; the layers compute
``(x / s) (diag(s) W)``, the same function in floating point, with flatter activations. Put it
*before* the quantizing method in ``methods`` (e.g. ``[smoothquant, ptq]``).

Where ``x`` is a LayerNorm's output consumed only by those layers, ``1/s`` is folded into the norm's
weight and bias (no run-time cost). Whether that is safe is checked, not assumed: a fold that changes
the model's output (post-LN BERT/MiniLM, where the norm's output also feeds a residual) is undone and
the division stays in the layer, where a deployed model fuses it into the activation quantize step
(a per-channel activation scale). ``layers: all`` also smooths layers not fed by a norm (attention
output, fc2) — an extension; the paper smooths only norm-fed layers (the default). Their division is
folded into the Linear that produces their input where that is exact, again checked on a probe batch:
the attention output's into the value projection's rows (attention mixes tokens, not channels), a layer
after a ReLU into the one before it; after a GELU (fc2) it stays a run-time division. ``layers: outliers``
is ``all`` except that such a run-time division is kept only where the input's largest channel stands out
(max |x_j| over the median channel's ``>= outlier_ratio``): the layers whose outliers pay for the extra kernel.

Decoder LLMs (a ``bitsmith.topology`` adapter: Llama, Gemma) are smoothed block by block through
``bitsmith.sequential``, so only one block's activations are held: the maxima are observed on the block's
inputs as produced by the blocks before it, and ``1/s`` is folded with the adapter (RMSNorm gain, Gemma's
``1 + w`` included; ``layers: all`` adds ``v_proj -> o_proj`` and ``up_proj -> down_proj``), exact by
construction, so no fold check is needed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.data import drop_padding
from bitsmith.method import Method, eval_mode, register_method, run_forward
from bitsmith.nn import QLinear, QuantizedMixin
from bitsmith.quant.layers import to_quantized
from bitsmith.sequential import BlockInputs, run_block, sequential
from bitsmith.swap import swap
from bitsmith.topology import DecoderTopology, has_topology

Key = tuple[int, tuple[int, ...], tuple[int, ...]]


def tensor_key(x: Tensor) -> Key:
    """Identity of a tensor's values in memory: two modules fed by the same tensor see the same key."""
    return x.data_ptr(), tuple(x.shape), tuple(x.stride())


def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm-like modules with a per-channel affine weight."""
    is_named = type(module).__name__.endswith(("LayerNorm", "RMSNorm"))
    return (isinstance(module, nn.LayerNorm) or is_named) and isinstance(getattr(module, "weight", None), Tensor)


def output_tensors(out: Any) -> list[Tensor]:
    """The tensors of a model output (tensor, tuple, dict or HF ModelOutput), in order."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in output_tensors(item)]
    return []


def same_output(a: Any, b: Any, rtol: float = 1e-3) -> bool:
    """Whether two model outputs agree to float rounding (relative to each tensor's scale)."""
    ta, tb = output_tensors(a), output_tensors(b)
    return len(ta) == len(tb) and all(
        x.shape == y.shape and float((x - y).abs().max()) <= rtol * float(x.abs().max()) + 1e-6
        for x, y in zip(ta, tb, strict=True)
    )


@register_method("smoothquant")
@dataclass
class SmoothQuant(Method):
    """Per-channel smoothing scales from calibration data; list it before ``ptq`` / ``noisyquant``."""

    description = "SmoothQuant: migrate activation outliers into the weights (folded into LayerNorm when exact)"

    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    layers: Literal["norm-fed", "all", "outliers"] = "norm-fed"
    outlier_ratio: Annotated[float, Field(ge=1.0)] = 8.0
    fold: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._layers: list[str] = []
        self.report: dict[str, dict[str, Any]] = {}

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        def linear_only(name: str, module: nn.Module, overrides: dict[str, Any]) -> nn.Module:
            if isinstance(module, nn.Conv2d):
                return module
            if isinstance(module, QuantizedMixin) and module.weight_q is not None:
                raise ValueError(
                    f"smoothquant: layer {name!r} already has a weight quantizer; list smoothquant before "
                    "the quantizing method in `methods` (e.g. [smoothquant, ptq])"
                )
            return to_quantized(module)

        specs = swap(model, self.where, linear_only)
        self._layers = [n for n in specs if isinstance(model.get_submodule(n), QLinear)]
        return {n: specs[n] for n in self._layers}

    def smoothing_scale(self, a_max: Tensor, weights: list[Tensor]) -> Tensor:
        """``s_j = max|x_j|^alpha / max|W_j|^(1-alpha)`` over the linears fed by one tensor (1 where x_j is 0)."""
        w_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
        scale = a_max.clamp(min=1e-5).pow(self.alpha) / w_max.clamp(min=1e-5).pow(1 - self.alpha)
        return torch.where(a_max > 0, scale.clamp(min=1e-5), torch.ones_like(scale))

    @torch.no_grad()
    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        batches = list(batches)
        if has_topology(model):
            self._stats = sequential(model, batches, self._block, "smoothquant").__dict__
            return
        keys, act_max, norm_of = self._observe(model, batches)
        probe = _probe(batches[0])
        with eval_mode(model):
            reference = run_forward(model, probe)
            groups: dict[Key, list[str]] = {}
            for name in self._layers:
                groups.setdefault(keys[name], []).append(name)
            for key, names in groups.items():
                norm_name = norm_of.get(key)
                if norm_name is None and self.layers == "norm-fed":
                    continue
                layers = [model.get_submodule(n) for n in names]
                scale = self.smoothing_scale(act_max[names[0]], [layer.weight for layer in layers])
                folded = (
                    norm_name is not None
                    and self.fold
                    and self._try_fold(model, norm_name, layers, scale, probe, reference)
                )
                feeder = None
                if not folded:
                    for layer in layers:
                        layer.set_smooth(scale)
                    feeder = self._fold_into_feeder(model, names, scale, probe, reference) if self.fold else None
                ratio = outlier_ratio(act_max[names[0]])
                kept = folded or feeder is not None or norm_name is not None or self.layers != "outliers"
                if not kept and ratio < self.outlier_ratio:  # a run-time division its outliers do not pay for
                    for layer in layers:
                        _unsmooth(layer)
                for name in names:
                    self.report[name] = {"norm": norm_name, "folded": folded or feeder is not None, "feeder": feeder,
                                         "max_scale": float(scale.max()), "outlier_ratio": ratio,
                                         "smoothed": kept or ratio >= self.outlier_ratio}  # fmt: skip

    @torch.no_grad()
    def _block(self, name: str, block: nn.Module, inputs: BlockInputs, topo: DecoderTopology) -> None:
        """Smooth one decoder block: observe its groups' input maxima, fold ``1/s`` into each feeder."""
        mine = {n for n, _ in block.named_modules() if f"{name}.{n}" in self._layers}
        groups = [g for g in topo.block_groups(block) if set(g.linears) <= mine]
        if self.layers == "norm-fed":
            groups = [g for g in groups if not isinstance(block.get_submodule(g.prev), nn.Linear)]
        act_max: dict[str, Tensor] = {}

        hooks = {block.get_submodule(g.linears[0]): lambda m, a, o, key=g.linears[0]: _track_max(act_max, key, a[0])
                 for g in groups}  # fmt: skip
        run_block(block, inputs, hooks)
        for group in groups:  # in execution order; a feeder linear is smoothed after the group it feeds
            layers = [block.get_submodule(n) for n in group.linears]
            scale = self.smoothing_scale(act_max[group.linears[0]], [layer.weight for layer in layers])
            topo.divide_feeder(block, group, scale)
            for layer in layers:
                layer.weight.mul_(scale.to(layer.weight)[None, :])
            for n in group.linears:
                self.report[f"{name}.{n}"] = {"norm": f"{name}.{group.prev}", "folded": True,
                                              "max_scale": float(scale.max())}  # fmt: skip

    def _observe(
        self, model: nn.Module, batches: list[Any]
    ) -> tuple[dict[str, Key], dict[str, Tensor], dict[Key, str]]:
        """Input keys (first batch), per-channel max |input| of each layer, and which norm made which key."""
        keys: dict[str, Key] = {}
        act_max: dict[str, Tensor] = {}
        norm_of: dict[Key, str] = {}
        alive: list[Tensor] = []  # keeps first-batch tensors alive so their addresses are not reused
        first = [True]

        def on_input(name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if first[0]:
                keys[name] = tensor_key(x)
                alive.append(x)
            _track_max(act_max, name, x)

        def on_norm(name: str, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            if first[0] and isinstance(out, Tensor):
                norm_of[tensor_key(out)] = name
                alive.append(out)

        handles = [
            model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: on_input(n, m, a)) for n in self._layers
        ]
        handles += [
            m.register_forward_hook(lambda mod, a, o, n=n: on_norm(n, mod, a, o))
            for n, m in model.named_modules()
            if is_norm(m)
        ]
        try:
            with eval_mode(model):
                for batch in batches:
                    run_forward(model, batch)
                    first[0] = False
                    alive.clear()
        finally:
            for handle in handles:
                handle.remove()
        return keys, act_max, norm_of

    def _try_fold(
        self, model: nn.Module, norm_name: str, layers: list[nn.Module], scale: Tensor, probe: Any, reference: Any
    ) -> bool:
        """Fold ``1/scale`` into the norm and ``scale`` into the weights; undo when the output changes."""
        norm = model.get_submodule(norm_name)
        saved = _divide_outputs(norm, scale)
        weights = [layer.weight.detach().clone() for layer in layers]
        for layer in layers:
            layer.weight.mul_(scale.to(layer.weight)[None, :])
        if same_output(reference, run_forward(model, probe)):
            return True
        _restore(norm, saved)
        for layer, weight in zip(layers, weights, strict=True):
            layer.weight.copy_(weight)
        return False

    def _fold_into_feeder(
        self, model: nn.Module, names: list[str], scale: Tensor, probe: Any, reference: Any
    ) -> str | None:
        """Move the smoothed layers' run-time division ``x / s`` into the Linear that produces ``x`` (its output
        rows and bias divided by ``s``) when the model's output stays the same: the attention output's input is
        the value projection's output mixed over tokens, so dividing V's rows is exact. Returns the feeder's name."""
        layers = [model.get_submodule(n) for n in names]
        for candidate in feeder_candidates(model, names[0], int(scale.numel())):
            feeder = model.get_submodule(candidate)
            if any(feeder is layer for layer in layers):
                continue
            saved = _divide_outputs(feeder, scale)
            smooth = [layer.smooth for layer in layers]
            for layer in layers:
                layer.smooth = None
            if same_output(reference, run_forward(model, probe)):
                return candidate
            _restore(feeder, saved)
            for layer, s in zip(layers, smooth, strict=True):
                layer.smooth = s
        return None


def outlier_ratio(act_max: Tensor) -> float:
    """How far the largest input channel stands out: its max |x| over the median channel's."""
    return float(act_max.max() / act_max.median().clamp(min=1e-8))


@torch.no_grad()
def _unsmooth(layer: nn.Module) -> None:
    """Undo ``set_smooth``: the weight's input columns divided back, no run-time division."""
    layer.weight.div_(layer.smooth[None, :])
    layer.smooth = None


def _divide_outputs(module: nn.Module, scale: Tensor) -> tuple[Tensor, Tensor | None]:
    """Divide a norm's gain or a Linear's rows, and the bias, by ``scale`` per output channel (in place);
    returns the weight and bias as they were, for :func:`_restore`."""
    saved = module.weight.detach().clone(), None if module.bias is None else module.bias.detach().clone()
    weight = module.weight
    weight.div_(scale.to(weight).view(-1, *[1] * (weight.dim() - 1)))
    if module.bias is not None:
        module.bias.div_(scale.to(module.bias))
    return saved


def _restore(module: nn.Module, saved: tuple[Tensor, Tensor | None]) -> None:
    module.weight.copy_(saved[0])
    if module.bias is not None:
        module.bias.copy_(saved[1])


def feeder_candidates(model: nn.Module, name: str, width: int, limit: int = 4) -> list[str]:
    """Linear layers that may produce ``name``'s input: in the same grandparent module, defined before it,
    with ``width`` outputs; nearest first, at most ``limit`` (each is tried and checked, not assumed)."""
    parts = name.split(".")
    scope = ".".join(parts[:-2])
    prefix = f"{scope}." if scope else ""
    before = []
    for other, module in model.named_modules():
        if other == name:
            break
        if other.startswith(prefix) and isinstance(module, nn.Linear) and module.out_features == width:
            before.append(other)
    return before[::-1][:limit]


def _track_max(act_max: dict[str, Tensor], key: str, x: Tensor) -> None:
    """Fold ``x``'s per-channel max |x| (last dim; padding dropped) into the running maximum ``act_max[key]``."""
    m = drop_padding(x.detach()).abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
    act_max[key] = m if key not in act_max else torch.maximum(act_max[key], m)


def _probe(batch: Any, size: int = 4) -> Any:
    """The first few examples of a batch, for cheap function-preservation checks."""
    if isinstance(batch, Tensor):
        return batch[:size]
    if isinstance(batch, dict):
        return {k: _probe(v, size) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_probe(v, size) for v in batch)
    return batch
