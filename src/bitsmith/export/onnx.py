"""ONNX export with QuantizeLinear / DequantizeLinear (QDQ) pairs, and an ONNX Runtime runner.

Each ``QLinear`` / ``QConv2d`` whose quantizers an 8-bit QDQ pair can express exactly (uniform
weights per tensor or per output channel, static per-tensor input, 2..8 bits) becomes a
:class:`QDQLayer`: its input is divided by the SmoothQuant scale, shifted by the NoisyQuant noise,
clipped to its grid and quantized; its weight is the hard-quantized grid (the noise correction
folded into the bias). Narrower grids sit exactly inside the int8 / uint8 range, so the exported
graph computes what bitsmith's fake-quant model computes, and ONNX Runtime runs it with integer
kernels. Any other compressed layer falls back to float (its hard-quantized weight, no input
quantization) with a warning naming it.

Exact up to float rounding: ONNX Runtime quantizes ``x * (1/s)``, bitsmith ``x / s``; the two differ
by an ulp, which flips a code at an exact half-step (a few codes in a million). Through a deep network
with per-tensor activation grids such a flip can cascade: on W8A8 all-MiniLM-L6-v2 the deployed and the
fake-quant embeddings agree to cosine >= 0.998 per sentence, and the fake-quant model agrees with itself
run batched vs one sentence at a time only to 0.9968; both are 0.9930 (mean) to the FP32 embeddings.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.nn import QConv2d, QLinear, QuantizedMixin, _conv_args, strip
from bitsmith.quant.noisy import NoisyBias
from bitsmith.quant.uniform import UniformQuantizer
from bitsmith.swap import set_submodule


def _qdq_range(symmetric: bool) -> tuple[int, int]:
    """The 8-bit range holding a grid: int8 for symmetric (signed) codes, uint8 for affine ones."""
    return (-128, 127) if symmetric else (0, 255)


def unsupported(layer: QuantizedMixin) -> str | None:
    """Why ``layer`` cannot be exported as QDQ (None when it can)."""
    wq, iq = layer.weight_q, layer.input_q
    inner = iq.inner if isinstance(iq, NoisyBias) else iq
    if not isinstance(wq, UniformQuantizer) or wq.granularity not in ("tensor", "channel") or wq.binary:
        return "weights are not uniform per-tensor / per-channel"
    if wq.granularity == "channel" and wq.ch_axis != 0:
        return "per-channel weight scales are not along the output channels"
    if not isinstance(inner, UniformQuantizer) or inner.dynamic or inner.granularity != "tensor" or inner.binary:
        return "the input is not quantized statically per tensor"
    if max(wq.bits, inner.bits) > 8:
        return f"{max(wq.bits, inner.bits)}-bit codes exceed the 8-bit QDQ range"
    if isinstance(iq, NoisyBias) and isinstance(layer, QConv2d):
        return "NoisyQuant noise is exported for Linear layers only"
    return None


class QDQLayer(nn.Module):
    """The export form of a ``QLinear`` / ``QConv2d``: 8-bit QDQ around input and weight."""

    def __init__(self, layer: QuantizedMixin) -> None:
        super().__init__()
        wq, iq = layer.weight_q, layer.input_q
        assert isinstance(wq, UniformQuantizer) and iq is not None
        inner = iq.inner if isinstance(iq, NoisyBias) else iq
        assert isinstance(inner, UniformQuantizer)
        weight = layer.effective_weight().detach()
        bias = layer.bias.detach().clone() if layer.bias is not None else None  # type: ignore[attr-defined]
        noise = iq.noise.detach() if isinstance(iq, NoisyBias) else None
        if noise is not None and not iq.folded:  # inner(x + N) - N: the -N goes through the layer into the bias
            correction = weight @ noise
            bias = -correction if bias is None else bias - correction
        self.conv = _conv_args(layer) if isinstance(layer, QConv2d) else None
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("smooth", None if layer.smooth is None else layer.smooth.detach().clone())
        self.register_buffer("noise", noise)
        self.register_buffer("w_scale", wq.scale.detach().float().reshape(-1).clone())
        self.register_buffer("w_zero", wq.zero_point.detach().round().to(torch.int32).reshape(-1).clone())
        self.w_range = _qdq_range(wq.symmetric)
        scale, zero = float(inner.scale.reshape(())), int(round(float(inner.zero_point.reshape(()))))
        self.register_buffer("x_scale", torch.tensor(scale))
        self.register_buffer("x_zero", torch.tensor(zero, dtype=torch.int32))
        self.x_range = _qdq_range(inner.symmetric)
        self.x_clip = ((inner.qmin - zero) * scale, (inner.qmax - zero) * scale) if inner.bits < 8 else None

    def forward(self, x: Tensor) -> Tensor:
        if self.smooth is not None:
            x = x / self.smooth
        if self.noise is not None:
            x = x + self.noise
        if self.x_clip is not None:
            x = x.clamp(*self.x_clip)
        x = torch.fake_quantize_per_tensor_affine(x, self.x_scale, self.x_zero, *self.x_range)
        if self.w_scale.numel() == 1:
            w = torch.fake_quantize_per_tensor_affine(self.weight, self.w_scale[0], self.w_zero[0], *self.w_range)
        else:
            w = torch.fake_quantize_per_channel_affine(self.weight, self.w_scale, self.w_zero, 0, *self.w_range)
        if self.conv is None:
            return nn.functional.linear(x, w, self.bias)
        args = self.conv
        return nn.functional.conv2d(x, w, self.bias, args["stride"], args["padding"], args["dilation"], args["groups"])


@torch.no_grad()
def deployable(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``model`` with QDQ export layers and every other compressed module made plain;
    returns it and ``{layer: why it stays float}``."""
    model = copy.deepcopy(model).eval()
    fallbacks: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, (QLinear, QConv2d)) and module.weight_q is not None:
            reason = unsupported(module)
            if reason is None:
                set_submodule(model, name, QDQLayer(module))
            else:
                fallbacks[name] = reason
    return strip(model), fallbacks


class _Keywords(nn.Module):
    """Positional inputs -> keyword call; the first output (``last_hidden_state`` of an HF encoder)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: Tensor) -> Tensor:
        out = self.model(**dict(zip(self.names, tensors, strict=True)))
        return out if isinstance(out, Tensor) else out[0]


def export_onnx(
    model: nn.Module, example: Tensor | dict[str, Tensor], path: str | os.PathLike[str], opset: int = 17
) -> dict[str, Any]:
    """Write ``model`` (compressed or not) as ONNX with QDQ nodes. A dict ``example`` (tokenizer output)
    is passed by keyword and the first output kept; batch and sequence dimensions are dynamic.
    Returns ``{"path", "fallbacks"}``; layers that stay float are also named in a warning."""
    path = Path(path)
    deploy, fallbacks = deployable(model)
    if fallbacks:
        names = ", ".join(f"{n} ({why})" for n, why in fallbacks.items())
        warnings.warn(f"exported in float, not QDQ: {names}", stacklevel=2)
    inputs = example if isinstance(example, dict) else {"input": example}
    if isinstance(example, dict):
        deploy = _Keywords(deploy, list(inputs))
    axes = {name: {0: "batch", 1: "sequence"} if isinstance(example, dict) else {0: "batch"} for name in inputs}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(deploy, tuple(inputs.values()), str(tmp), input_names=list(inputs), output_names=["output"],
                          dynamic_axes={**axes, "output": {0: "batch"}}, opset_version=opset, dynamo=False)  # fmt: skip
    os.replace(tmp, path)
    return {"path": str(path), "fallbacks": fallbacks}


class OnnxRuntimeModel:
    """An exported model in an ONNX Runtime session (CPU, fixed threads, all graph optimisations).
    Called with a tensor it returns the output tensor; called with keywords (tokenizer output) it
    answers like a Hugging Face encoder (``.last_hidden_state``)."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def _run(self, feeds: dict[str, Tensor]) -> Tensor:
        arrays = {k: v.detach().cpu().numpy() for k, v in feeds.items() if k in self.inputs}
        return torch.from_numpy(self.session.run(None, arrays)[0])

    def __call__(self, x: Tensor | None = None, **keywords: Tensor) -> Any:
        if x is not None:
            return self._run({self.inputs[0]: x})
        return SimpleNamespace(last_hidden_state=self._run(keywords))

    training = False  # the evaluation helpers switch train/eval modes; a session has none

    def eval(self) -> OnnxRuntimeModel:
        return self

    def train(self, mode: bool = True) -> OnnxRuntimeModel:
        return self
