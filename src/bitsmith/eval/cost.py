"""Model cost: parameters, storage size at the assigned bit-widths, MACs and BOPs, per layer and total.

One module shared by reports and solvers. Size counts weight codes at their storage width, the
quantizers' own parameters (scales, zero points, levels), masks at one bit per weight, biases in
float32, and every other parameter or persistent buffer at its dtype's width.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from bitsmith.method import forward_with_hooks
from bitsmith.nn import QEmbedding, QuantizedMixin, is_hf_conv1d


@dataclass
class LayerCost:
    name: str
    type: str
    params: int
    weight_bits: float
    act_bits: int
    size_bits: int
    sparsity: float
    code_bits: float = 32.0  # stored bits per weight (sign-magnitude codes: weight_bits + 1)
    macs: int | None = None

    @property
    def bops(self) -> int | None:
        """Bit operations: MACs x weight bits x activation bits."""
        return None if self.macs is None else round(self.macs * self.weight_bits * self.act_bits)


@dataclass
class CostReport:
    layers: list[LayerCost]
    other_params: int
    other_bits: int
    totals: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        layers = [{**asdict(layer), "bops": layer.bops} for layer in self.layers]
        return {"layers": layers, "other_params": self.other_params, "other_bits": self.other_bits, **self.totals}


def _dtype_bits(t: torch.Tensor) -> int:
    return (
        torch.finfo(t.dtype).bits
        if t.is_floating_point()
        else torch.iinfo(t.dtype).bits
        if t.dtype != torch.bool
        else 1
    )


def _is_weight_layer(module: nn.Module) -> bool:
    """Linear / conv layers and embedding tables (float or compressed: a float table counts at 32 bits)."""
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, QEmbedding)
    return isinstance(module, layers) or is_hf_conv1d(module)


@torch.no_grad()
def layer_cost(name: str, module: nn.Module) -> LayerCost:
    weight = module.weight
    params = weight.numel()
    bias_bits = 0 if getattr(module, "bias", None) is None else module.bias.numel() * _dtype_bits(module.bias)
    if isinstance(module, QuantizedMixin):
        wq, iq = module.weight_q, module.input_q
        w_bits = wq.bits if wq is not None else _dtype_bits(weight)
        code_bits = wq.code_bits if wq is not None else _dtype_bits(weight)
        kept = params if module.mask is None else int(module.mask.sum())  # pruned entries are not stored
        size = math.ceil(kept * code_bits) + (wq.overhead_bits() if wq is not None else 0)
        size += params if module.mask is not None else 0  # the mask, one bit per weight
        size += iq.overhead_bits() if iq is not None else 0
        a_bits = iq.bits if iq is not None else 32
        sparsity = float((module.effective_weight() == 0).float().mean())
    else:
        w_bits = code_bits = _dtype_bits(weight)
        size, a_bits = params * w_bits, 32
        sparsity = float((weight == 0).float().mean())
    return LayerCost(
        name, type(module).__name__, params, float(w_bits), a_bits, size + bias_bits, sparsity, float(code_bits)
    )


def _macs_per_output(module: nn.Module) -> int:
    if isinstance(module, nn.Embedding):
        return 0  # a lookup
    if isinstance(module, nn.Linear):
        return module.in_features
    if is_hf_conv1d(module):
        return module.weight.shape[0]
    return module.weight[0].numel()  # conv: in/groups * prod(kernel)


def measure_macs(model: nn.Module, example: Any, names: list[str]) -> dict[str, int]:
    """MACs of each named layer for one forward pass on ``example`` (a batch as ``run_forward`` takes)."""
    macs: dict[str, int] = {}

    def hook(mod: nn.Module, inputs: Any, output: torch.Tensor, name: str) -> None:
        macs[name] = macs.get(name, 0) + output.numel() * _macs_per_output(mod)

    forward_with_hooks(model, example, {model.get_submodule(n): functools.partial(hook, name=n) for n in names})
    return macs


def model_cost(model: nn.Module, example: Any | None = None) -> CostReport:
    """Per-layer and total cost of ``model``; MACs and BOPs need an ``example`` batch."""
    layers: list[LayerCost] = []
    owned: set[int] = set()
    for name, module in model.named_modules():
        if name and _is_weight_layer(module):
            if id(getattr(module, "weight", None)) in owned:
                continue  # a tied weight (an LM head sharing the embedding table) is stored and counted once
            layers.append(layer_cost(name, module))
            owned.update(id(b) for b in module.buffers(recurse=True))
            owned.update(id(p) for p in module.parameters(recurse=True))
    seen: set[int] = set()
    other_params = other_bits = 0
    for tensor in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
        if id(tensor) in owned or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        other_bits += tensor.numel() * _dtype_bits(tensor)
        if isinstance(tensor, nn.Parameter):
            other_params += tensor.numel()
    if example is not None:
        macs = measure_macs(model, example, [layer.name for layer in layers])
        for layer in layers:
            layer.macs = macs.get(layer.name, 0)
    weight_params = sum(layer.params for layer in layers)
    size_bits = sum(layer.size_bits for layer in layers) + other_bits
    totals: dict[str, Any] = {
        "params": weight_params + other_params + sum(_bias_params(model, layer.name) for layer in layers),
        "size_bits": size_bits,
        "size_bytes": (size_bits + 7) // 8,
        "avg_weight_bits": sum(layer.weight_bits * layer.params for layer in layers) / max(weight_params, 1),
        "avg_code_bits": sum(layer.code_bits * layer.params for layer in layers) / max(weight_params, 1),
        "sparsity": sum(layer.sparsity * layer.params for layer in layers) / max(weight_params, 1),
    }
    if example is not None:
        totals["macs"] = sum(layer.macs or 0 for layer in layers)
        totals["bops"] = sum(layer.bops or 0 for layer in layers)
    return CostReport(layers, other_params, other_bits, totals)


def _bias_params(model: nn.Module, name: str) -> int:
    bias = getattr(model.get_submodule(name), "bias", None)
    return 0 if bias is None else bias.numel()
