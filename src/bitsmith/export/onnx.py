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
    """Write ``model`` (compressed or not) as ONNX with QDQ nodes. A dict ``example`` (tokenizer output)
    is passed by keyword and the first output kept; batch and sequence dimensions are dynamic.
    Returns ``{"path", "fallbacks"}``; layers that stay float are also named in a warning."""
    path = Path(path)
    deploy, fallbacks = deployable(model)
    inputs = example if isinstance(example, dict) else {"input": example}
    if isinstance(example, dict):
        deploy = KeywordInputs(deploy, list(inputs))
    dynamic = {0: "batch", 1: "sequence"} if isinstance(example, dict) else {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(deploy, tuple(inputs.values()), str(tmp), input_names=list(inputs), output_names=["output"],
                          dynamic_axes={name: dynamic for name in [*inputs, "output"]}, opset_version=opset, dynamo=False)  # fmt: skip
    os.replace(tmp, path)
    return {"path": str(path), "fallbacks": fallbacks}


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
