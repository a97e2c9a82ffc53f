"""The PyTorch integer path: the QDQ model (``quantized_decomposed`` ops, as torchao's PT2E
``convert_pt2e`` writes them) captured with ``torch.export`` and compiled by Inductor with freezing,
whose x86 passes (registered by torchao) fuse each QDQ pair and its layer into a oneDNN int8
kernel (``qlinear_pointwise`` / ``qconv_pointwise``). Token models accept any batch and sequence
length; image models are compiled again for each new batch size.

Before compiling, layers that read one tensor through equal input quantizers (an attention's q / k / v) are
made to share one quantize step and run as one int8 GEMM over their stacked weights
(:mod:`bitsmith.export.graph_passes`)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.export.graph_passes import fuse_shared_input_linears, share_input_quantize
from bitsmith.export.qdq import KeywordInputs, Runner, deployable


def pt2e_available() -> bool:
    """torchao (its x86 Inductor passes) is installed, this is an x86 CPU and Inductor finds a C++ compiler."""
    import importlib.util
    import os
    import platform
    import shutil

    compiler = any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++"))
    x86 = platform.machine() in ("x86_64", "AMD64")
    return importlib.util.find_spec("torchao") is not None and x86 and compiler


def _dynamic_shapes(tensors: list[Tensor], keyed: bool) -> tuple[Any, ...]:
    """Batch (and, for token inputs, sequence) dimensions free; keyed inputs are ``*tensors``."""
    auto = torch.export.Dim.AUTO
    if not keyed:
        return ({0: auto},)
    return (tuple({0: auto, 1: auto} if t.dim() > 1 else {0: auto} for t in tensors),)


def export_graph(model: nn.Module, example: Tensor | dict[str, Tensor]) -> tuple[nn.Module, list[str], list[Tensor]]:
    """``model`` captured by ``torch.export`` (positional inputs, batch / sequence dimensions free):
    (graph module, input names, example tensors). torchao's ``prepare_pt2e`` takes this graph too."""
    keyed = isinstance(example, dict)
    inputs = example if isinstance(example, dict) else {"input": example}
    if keyed:
        model = KeywordInputs(model, list(inputs))
    tensors = list(inputs.values())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, tuple(tensors), dynamic_shapes=_dynamic_shapes(tensors, keyed))
    return program.module(), list(inputs), tensors


class CompiledModel(Runner):
    """An exported QDQ graph compiled by Inductor with freezing; compiled on construction."""

    def __init__(self, graph: nn.Module, names: list[str], tensors: list[Tensor], keyed: bool) -> None:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  (registers x86 passes)

        self.inputs, self.fallbacks = names, {}
        # Token models compile once for all shapes; image models once per batch size (Inductor's
        # dynamic-shape qconv lowering asserts the wrong output strides in torch 2.13).
        self.module = torch.compile(graph, dynamic=keyed)
        self._forward(tensors)  # compile now, not on the first timed call

    @classmethod
    def from_model(cls, model: nn.Module, example: Tensor | dict[str, Tensor]) -> CompiledModel:
        """``model`` (compressed by bitsmith) in its QDQ form, exported and compiled."""
        deploy, fallbacks = deployable(model, ops="pt2e")
        graph, names, tensors = export_graph(deploy, example)
        share_input_quantize(graph)
        fuse_shared_input_linears(graph)
        compiled = cls(graph, names, tensors, keyed=isinstance(example, dict))
        compiled.fallbacks = fallbacks
        return compiled

    def _forward(self, tensors: list[Tensor]) -> Tensor:
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):  # freezing folds the weights
            return self.module(*tensors)
