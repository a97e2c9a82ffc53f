"""Exact clean-ups of an exported QDQ graph (``torch.export``, ``quantized_decomposed`` ops) before Inductor.

- :func:`share_input_quantize`: layers that quantize one tensor the same way (an attention's q / k / v, each
  with its own copy of the same SmoothQuant division and input grid) read one quantized tensor.
- :func:`fuse_shared_input_linears`: Linear layers on that one quantized tensor, with per-output-channel weight
  grids, become one int8 GEMM over their stacked weights, whose output is sliced back; the per-channel
  grids make stacking exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn

SHAREABLE = ("aten.div.Tensor", "aten.mul.Tensor", "aten.clamp.default", "aten.add.Tensor",
             "quantized_decomposed.quantize_per_tensor.default", "quantized_decomposed.dequantize_per_tensor.default")  # fmt: skip
LARGEST_SHARED_CONSTANT = 1 << 16  # elements: smoothing vectors and scales, not weights


def share_input_quantize(graph: fx.GraphModule) -> int:
    """Merge equal small constants (buffers with the same values), then identical elementwise / per-tensor
    quantize nodes on the same inputs. Exact: every merged node computes the same values. Returns how many
    nodes were removed."""
    tables: dict[str, dict[tuple[Any, ...], fx.Node]] = {"const": {}, "call": {}}
    removed = 0
    for node in list(graph.graph.nodes):
        if node.op == "get_attr":
            value = _attribute(graph, str(node.target))
            if not isinstance(value, Tensor) or value.requires_grad or value.numel() > LARGEST_SHARED_CONSTANT:
                continue
            kind, key = "const", (value.dtype, tuple(value.shape), value.detach().cpu().numpy().tobytes())
        elif node.op == "call_function" and str(node.target) in SHAREABLE:
            kind, key = "call", (str(node.target), _hashable(node.args), _hashable(node.kwargs))
        else:
            continue
        if key in tables[kind]:
            node.replace_all_uses_with(tables[kind][key])
            graph.graph.erase_node(node)
            removed += 1
        else:
            tables[kind][key] = node
    graph.recompile()
    return removed


def fuse_shared_input_linears(graph: fx.GraphModule) -> int:
    """Stack the weights of the int8 Linear layers that read one node (their weights per-channel QDQ of
    constants, all with or all without bias) into one Linear, sliced back along the outputs. Returns the
    number of Linear layers removed."""
    groups: dict[fx.Node, list[tuple[fx.Node, dict[str, Any]]]] = {}
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            parts = _weight_parts(graph, node)
            if parts is not None:
                groups.setdefault(node.args[0], []).append((node, parts))
    removed = 0
    for x, members in groups.items():
        compatible = [m for m in members if _signature(m[1]) == _signature(members[0][1])]
        if len(compatible) >= 2:
            _fuse(graph, x, compatible)
            removed += len(compatible) - 1
    graph.recompile()
    return removed


def _weight_parts(graph: fx.GraphModule, linear: fx.Node) -> dict[str, Any] | None:
    """``{weight, scale, zero, qrange, bias}`` of a Linear whose weight is ``dequantize(quantize(W))`` per output
    channel with constant ``W``, scales and zero points (None for any other Linear)."""
    decomposed = torch.ops.quantized_decomposed
    dq = linear.args[1]
    if not (isinstance(dq, fx.Node) and dq.target == decomposed.dequantize_per_channel.default):
        return None
    q = dq.args[0]
    if not (isinstance(q, fx.Node) and q.target == decomposed.quantize_per_channel.default):
        return None
    weight, scale, zero, axis, *qrange = q.args
    bias = linear.args[2] if len(linear.args) > 2 else None
    nodes = [weight, scale, zero] + ([bias] if bias is not None else [])
    if axis != 0 or not all(isinstance(n, fx.Node) and n.op == "get_attr" for n in nodes):
        return None
    values = {
        name: _attribute(graph, str(n.target))
        for name, n in zip(("weight", "scale", "zero", "bias"), nodes, strict=False)
    }
    return {**values, "bias": values.get("bias"), "qrange": tuple(qrange)}


def _signature(parts: dict[str, Any]) -> tuple[Any, ...]:
    return parts["qrange"], parts["bias"] is None, parts["weight"].shape[1:], parts["weight"].dtype


def _fuse(graph: fx.GraphModule, x: fx.Node, members: list[tuple[fx.Node, dict[str, Any]]]) -> None:
    decomposed = torch.ops.quantized_decomposed
    stacked = {key: torch.cat([parts[key] for _, parts in members]) for key in ("weight", "scale", "zero", "bias")
               if members[0][1][key] is not None}  # fmt: skip
    first = members[0][0]
    attrs = {}
    with graph.graph.inserting_before(first):
        for key, value in stacked.items():
            name = _free_name(graph, f"fused_{first.name}_{key}")
            graph.register_buffer(name, value)
            attrs[key] = graph.graph.get_attr(name)
        qrange = members[0][1]["qrange"]
        q = graph.graph.call_function(decomposed.quantize_per_channel.default,
                                      (attrs["weight"], attrs["scale"], attrs["zero"], 0, *qrange))  # fmt: skip
        dq = graph.graph.call_function(decomposed.dequantize_per_channel.default,
                                       (q, attrs["scale"], attrs["zero"], 0, *qrange))  # fmt: skip
        fused = graph.graph.call_function(torch.ops.aten.linear.default, (x, dq, attrs.get("bias")))
        start = 0
        for node, parts in members:
            width = parts["weight"].shape[0]
            piece = graph.graph.call_function(torch.ops.aten.slice.Tensor, (fused, -1, start, start + width))
            piece.meta = dict(node.meta)
            node.replace_all_uses_with(piece)
            start += width
    for node, _ in members:
        graph.graph.erase_node(node)
    graph.graph.eliminate_dead_code()


def _free_name(module: nn.Module, base: str) -> str:
    name, index = base, 0
    while hasattr(module, name):
        index += 1
        name = f"{base}_{index}"
    return name


def _attribute(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value
