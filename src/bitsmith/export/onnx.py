"""ONNX export of a compressed model (QuantizeLinear / DequantizeLinear pairs, see
:mod:`bitsmith.export.qdq`) and an ONNX Runtime runner. ONNX Runtime fuses the QDQ pairs of Linear
layers into integer matmuls (``MatMulIntegerToFloat``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.export.qdq import KeywordInputs, Runner, deployable


def export_onnx(
    model: nn.Module, example: Tensor | dict[str, Tensor], path: str | os.PathLike[str], opset: int = 17
) -> dict[str, Any]:
    """Write ``model`` (compressed or not) as ONNX with QDQ nodes. A dict ``example`` (tokenizer output, or a
    noise predictor's ``sample`` and ``timestep``) is passed by keyword and the first output kept; the batch
    dimension is dynamic, and the sequence dimension of 2-d (token) inputs.
    Returns ``{"path", "fallbacks", "inputs"}`` (the input names); layers that stay float are also named in a warning."""
    import onnx

    path = Path(path)
    deploy, fallbacks = deployable(model)
    inputs = example if isinstance(example, dict) else {"input": example}
    if isinstance(example, dict):
        deploy = KeywordInputs(deploy, list(inputs))
    axes = {
        name: {0: "batch", 1: "sequence"} if isinstance(example, dict) and value.dim() == 2 else {0: "batch"}
        for name, value in inputs.items()
    }  # token ids: batch x sequence; images, time steps: batch
    axes["output"] = {0: "batch", 1: "sequence"} if any(len(a) == 2 for a in axes.values()) else {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(deploy, tuple(inputs.values()), str(tmp), input_names=list(inputs), output_names=["output"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)  # fmt: skip
    exported = onnx.load(str(tmp))
    for graph_pass in (store_int8_weights, quantize_before_flatten, merge_duplicate_qdq):
        graph_pass(exported.graph)
    onnx.save(exported, str(tmp))
    os.replace(tmp, path)
    return {"path": str(path), "fallbacks": fallbacks, "inputs": list(inputs)}


def store_int8_weights(graph: Any) -> None:
    """Replace each QuantizeLinear of a constant (a weight) by its int8 / uint8 codes, so the file holds
    8-bit weights (a quarter of float) feeding DequantizeLinear; unused constants are dropped."""
    import numpy as np
    from onnx import numpy_helper

    const = _constants(graph)
    nodes, codes = [], []
    for node in graph.node:
        values = [const(name) for name in node.input[:3]] if node.op_type == "QuantizeLinear" else []
        if len(values) == 3 and all(v is not None for v in values):
            weight, scale, zero = values
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * weight.ndim
            if scale.ndim:
                shape[axis] = -1
            info = np.iinfo(zero.dtype)
            q = np.rint(weight / scale.reshape(shape)) + zero.reshape(shape).astype(np.int32)
            codes.append(numpy_helper.from_array(np.clip(q, info.min, info.max).astype(zero.dtype), node.output[0]))
        else:
            nodes.append(node)
    _replace_nodes(graph, nodes, codes)


def quantize_before_flatten(graph: Any) -> None:
    """Where a per-tensor QuantizeLinear reads a Flatten / Reshape that nothing else reads, put a copy of the
    quantize step (and its DequantizeLinear) in front of the Flatten too: exact (the codes of a reshaped tensor are
    the reshaped codes), and the layer before (a global average pool) then sees its output quantized, which ONNX
    Runtime needs to run it in 8 bits."""
    import onnx

    const = _constants(graph)
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    producer = {out: node for node in graph.node for out in node.output}
    before: dict[int, list[Any]] = {}  # id of a Flatten / Reshape -> the quantize / dequantize pair to put first
    for node in graph.node:
        shape_op = producer.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if shape_op is None or shape_op.op_type not in ("Flatten", "Reshape") or readers.get(shape_op.output[0]) != 1:
            continue
        scale = const(node.input[1])
        if scale is None or scale.ndim or shape_op.input[0] in {i.name for i in graph.input}:
            continue
        codes, values = f"{shape_op.output[0]}_codes", f"{shape_op.output[0]}_qdq"
        before[id(shape_op)] = [onnx.helper.make_node("QuantizeLinear", [shape_op.input[0], *node.input[1:]], [codes]),
                                onnx.helper.make_node("DequantizeLinear", [codes, *node.input[1:]], [values])]  # fmt: skip
        shape_op.input[0] = values
    nodes = [new for node in graph.node for new in [*before.get(id(node), []), node]]
    _replace_nodes(graph, nodes, [])


def merge_duplicate_qdq(graph: Any) -> None:
    """Merge QuantizeLinear / DequantizeLinear nodes that read the same tensor with equal constant scale and zero
    point (a block input quantized both for its convolution and for the residual add): a tensor then has one
    quantize step, which ONNX Runtime needs to fuse the layer producing it into an integer kernel."""
    const = _constants(graph)
    nodes, renamed = list(graph.node), {}
    while True:
        seen: dict[tuple[Any, ...], str] = {}
        kept = []
        for node in nodes:
            inputs = [renamed.get(name, name) for name in node.input]
            del node.input[:]
            node.input.extend(inputs)
            params = [const(name) for name in node.input[1:]]
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and all(p is not None for p in params):
                key = (node.op_type, node.input[0], *(p.dtype.str + p.tobytes().hex() for p in params),
                       tuple(sorted((a.name, a.i) for a in node.attribute)))  # fmt: skip
                if key in seen:
                    renamed[node.output[0]] = seen[key]
                    continue
                seen[key] = node.output[0]
            kept.append(node)
        if len(kept) == len(nodes):
            break
        nodes = kept
    for output in graph.output:
        if output.name in renamed:
            raise ValueError(f"ONNX export: a graph output ({output.name}) is a duplicate quantize step")
    _replace_nodes(graph, nodes, [])


def _constants(graph: Any) -> Any:
    """``name -> numpy value`` of the graph's constant tensors (initializers, Constant nodes, through Identity)."""
    from onnx import numpy_helper

    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consts |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def const(name: str) -> Any:
        while name in alias:
            name = alias[name]
        return consts.get(name)

    return const


def _replace_nodes(graph: Any, nodes: list[Any], initializers: list[Any]) -> None:
    """Set the graph's nodes, add ``initializers``, and drop nodes and initializers nothing reads."""
    while True:
        used = {name for n in nodes for name in n.input} | {o.name for o in graph.output}
        kept = [n for n in nodes if any(out in used for out in n.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    kept_initializers = [init for init in graph.initializer if init.name in used]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend([*kept_initializers, *initializers])


class OnnxRuntimeModel(Runner):
    """An exported model in an ONNX Runtime session (CPU, fixed threads, all graph optimisations)."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def _forward(self, tensors: list[Tensor]) -> Tensor:
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.inputs, tensors, strict=True)}
        return torch.from_numpy(self.session.run(None, feeds)[0])
