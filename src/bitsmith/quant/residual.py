"""Quantizers on the inputs of residual adds and average pools (PTQ's ``residual_adds``, ``pool_inputs``).

A ResNet block ends in ``relu(bn2(conv2(h)) + shortcut(x))``. With only layer inputs quantized, the convolution
before the add and the add run in float on an integer backend. Fake-quantizing both inputs of the add (the batch
norm's output and the shortcut's) gives each convolution an 8-bit output and the add 8-bit operands, which is
what ONNX Runtime needs for ``QLinearConv`` + ``QLinearAdd``. oneDNN (the torchao backend) instead fuses the add
into the convolution before it, reading the shortcut as an 8-bit extra input: for it, quantize the shortcut operand
only (``operands="shortcut"``), as torchao's own PT2E flow annotates the same pattern. Only adds whose two inputs come from childless, uncompressed modules (batch norms, identity shortcuts)
are changed: wrapping them in :class:`~bitsmith.nn.QOutput` keeps every quantized layer's name.

The last block's add feeds the global average pool, not a quantized layer; quantizing the pool's input
(``pool_inputs``, :class:`~bitsmith.nn.QInput`) lets ONNX Runtime run that add and the pool in 8 bits too
(``QLinearAdd``, ``QLinearGlobalAveragePool``), as its own static flow does.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from bitsmith.nn import QInput, QOutput, is_compressed
from bitsmith.quant.base import Quantizer
from bitsmith.swap import set_submodule

ADDS = (operator.add, operator.iadd, torch.add)
POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)


class _ChildlessTracer(torch.fx.Tracer):
    """Every module without children (an empty ``nn.Sequential`` too) and every compressed layer is one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not list(m.children()) or is_compressed(m) or super().is_leaf_module(m, module_qualified_name)


def _is_add(node: torch.fx.Node) -> bool:
    function = node.op == "call_function" and node.target in ADDS
    return function or (node.op == "call_method" and node.target in ("add", "add_"))


def residual_add_inputs(model: nn.Module) -> list[tuple[str, str]]:
    """The two modules feeding each add of ``model`` whose inputs both come from childless, uncompressed modules
    (found with ``torch.fx``); ``[]`` when the model cannot be traced."""
    try:
        graph = _ChildlessTracer().trace(model)
    except Exception:  # noqa: BLE001 - dynamic control flow: nothing to change, reported by the caller
        return []
    modules = dict(model.named_modules())

    def source(arg: Any) -> str | None:
        if not isinstance(arg, torch.fx.Node) or arg.op != "call_module":
            return None
        module = modules[arg.target]  # type: ignore[index]
        return None if list(module.children()) or is_compressed(module) else str(arg.target)

    pairs = []
    for node in graph.nodes:
        if _is_add(node) and len(node.args) >= 2:
            first, second = source(node.args[0]), source(node.args[1])
            if first is not None and second is not None and first != second:
                pairs.append((first, second))
    return pairs


def quantize_residual_adds(
    model: nn.Module, make_quantizer: Callable[[], Quantizer], operands: Literal["both", "shortcut"] = "both"
) -> dict[str, dict[str, Any]]:
    """Wrap the modules feeding each residual add (both, or only the second operand: the shortcut of
    ``out + shortcut(x)``) in a :class:`QOutput` with a fresh quantizer (in place); returns ``{name: spec}`` of the
    wrapped modules."""
    specs: dict[str, dict[str, Any]] = {}
    for pair in residual_add_inputs(model):
        for name in pair if operands == "both" else pair[1:]:
            if name not in specs:  # a module feeding two adds is wrapped once
                wrapped = QOutput(model.get_submodule(name), make_quantizer())
                set_submodule(model, name, wrapped)
                specs[name] = wrapped.spec()
    return specs


def quantize_pool_inputs(model: nn.Module, make_quantizer: Callable[[], Quantizer]) -> dict[str, dict[str, Any]]:
    """Wrap each average pool of ``model`` in a :class:`QInput` with a fresh quantizer (in place); returns
    ``{name: spec}`` of the wrapped pools."""
    specs: dict[str, dict[str, Any]] = {}
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, POOLS)]:
        wrapped = QInput(module, make_quantizer())
        set_submodule(model, name, wrapped)
        specs[name] = wrapped.spec()
    return specs
