"""The deployable form of a compressed model: 8-bit quantize / dequantize (QDQ) pairs around each layer.

Each ``QLinear`` / ``QConv2d`` whose quantizers an 8-bit QDQ pair can express exactly (uniform
weights per tensor or per output channel, static per-tensor input, 2..8 bits) becomes a
:class:`QDQLayer`: its input is divided by the SmoothQuant scale, shifted by the NoisyQuant noise,
clipped to its grid and quantized; its weight is the hard-quantized grid (the noise correction
folded into the bias). Narrower grids sit exactly inside the int8 / uint8 range, so a backend that
fuses QDQ pairs into integer kernels computes what bitsmith's fake-quant model computes. Any other
compressed layer falls back to float (its hard-quantized weight, no input quantization). A batch
norm right after an exported convolution is folded into it (exact on a per-channel grid). A convolution whose
input and weight are split along the input channels (Q-Diffusion's split shortcut) becomes two QDQ convolutions,
one per channel group, summed (a convolution is linear in its input channels; the bias is added once).

Two spellings of the same arithmetic: ``ops="onnx"`` uses ``torch.fake_quantize_*`` (exported as ONNX
QuantizeLinear / DequantizeLinear), ``ops="pt2e"`` uses the ``quantized_decomposed`` ops that
torchao's PT2E flow produces, which Inductor's x86 passes lower to oneDNN int8 kernels.

Exact up to float rounding: the backends quantize ``x * (1/s)``, bitsmith ``x / s``; the two differ
by an ulp, which flips a code at an exact half-step (a few codes in a million). Through a deep network
with per-tensor activation grids such a flip can cascade: on W8A8 all-MiniLM-L6-v2 the deployed and the
fake-quant embeddings agree to cosine >= 0.998 per sentence, and the fake-quant model agrees with itself
run batched vs one sentence at a time only to 0.9968; both are 0.9930 (mean) to the FP32 embeddings.
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bitsmith.nn import (
    QConv2d,
    QEmbedding,
    QInput,
    QLinear,
    QuantizedActivation,
    QuantizedMixin,
    conv_args,
    embedding_args,
    strip,
)
from bitsmith.quant.bnfold import bn_scale, conv_bn_pairs, folded_bias
from bitsmith.quant.noisy import NoisyBias
from bitsmith.quant.split import SplitQuantizer
from bitsmith.quant.uniform import UniformQuantizer
from bitsmith.swap import set_submodule

Ops = Literal["onnx", "pt2e"]


def _qdq_range(symmetric: bool) -> tuple[int, int, torch.dtype]:
    """The 8-bit range holding a grid: int8 for symmetric (signed) codes, uint8 for affine ones."""
    return (-128, 127, torch.int8) if symmetric else (0, 255, torch.uint8)


def unsupported(layer: QuantizedMixin, ops: Ops = "onnx") -> str | None:
    """Why ``layer`` cannot be exported as QDQ for ``ops`` (None when it can)."""
    wq, iq = layer.weight_q, layer.input_q
    if isinstance(wq, SplitQuantizer) or isinstance(iq, SplitQuantizer):
        if not _channel_split(layer):
            return "split quantization other than one input-channel split of a convolution's input and weight"
        return next((why for part in split_parts(layer) if (why := unsupported(part, ops)) is not None), None)
    inner = iq.inner if isinstance(iq, NoisyBias) else iq
    if not isinstance(wq, UniformQuantizer) or wq.granularity not in ("tensor", "channel") or wq.binary:
        return "weights are not uniform per-tensor / per-channel"
    if wq.granularity == "channel" and wq.ch_axis != 0:
        return "per-channel weight scales are not along the output channels"
    if isinstance(layer, QEmbedding):
        return None if wq.bits <= 8 else f"{wq.bits}-bit codes exceed the 8-bit QDQ range"
    if not isinstance(inner, UniformQuantizer) or inner.dynamic or inner.granularity != "tensor" or inner.binary:
        return "the input is not quantized statically per tensor"
    if max(wq.bits, inner.bits) > 8:
        return f"{max(wq.bits, inner.bits)}-bit codes exceed the 8-bit QDQ range"
    if ops == "pt2e" and not wq.symmetric:
        return "asymmetric weights: the x86 int8 kernels take symmetric (int8) weights; quantize with w_symmetric"
    if isinstance(iq, NoisyBias) and isinstance(layer, QConv2d):
        return "NoisyQuant noise is exported for Linear layers only"
    return None


def _channel_split(layer: QuantizedMixin) -> bool:
    wq, iq = layer.weight_q, layer.input_q
    return (isinstance(layer, QConv2d) and layer.groups == 1 and isinstance(wq, SplitQuantizer)
            and isinstance(iq, SplitQuantizer) and wq.split == iq.split and wq.dim == iq.dim == 1)  # fmt: skip


def split_parts(layer: QuantizedMixin) -> tuple[QuantizedMixin, QuantizedMixin]:
    """A split convolution as two convolutions over its input-channel groups, each with its part's quantizers (the
    bias on the first); their outputs sum to the layer's."""
    wq, iq = layer.weight_q, layer.input_q
    assert isinstance(wq, SplitQuantizer) and isinstance(iq, SplitQuantizer)
    weight = layer.masked_weight().detach()
    parts = []
    for w_q, i_q, w, bias in ((wq.first, iq.first, weight[:, : wq.split], True),
                              (wq.second, iq.second, weight[:, wq.split :], False)):  # fmt: skip
        part = copy.deepcopy(layer)
        part.weight, part.mask, part.in_channels = nn.Parameter(w.clone(), requires_grad=False), None, w.shape[1]
        if not bias:
            part.bias = None
        part.weight_q, part.input_q = w_q, i_q
        parts.append(part)
    return parts[0], parts[1]


class QDQSplitLayer(nn.Module):
    """The export form of a split convolution: one :class:`QDQLayer` per input-channel group, summed."""

    def __init__(self, layer: QuantizedMixin, ops: Ops = "onnx") -> None:
        super().__init__()
        self.split = layer.weight_q.split  # type: ignore[union-attr]
        first, second = split_parts(layer)
        self.first, self.second = QDQLayer(first, ops), QDQLayer(second, ops)

    def forward(self, x: Tensor) -> Tensor:
        return self.first(x[:, : self.split]) + self.second(x[:, self.split :])


def _weight_qdq(weight: Tensor, scale: Tensor, zero: Tensor, qrange: tuple[int, int, torch.dtype], ops: Ops) -> Tensor:
    """The (already on-grid) weight through an 8-bit per-output-channel quantize / dequantize pair."""
    lo, hi, dtype = qrange
    if ops == "onnx":
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, lo, hi)
    decomposed = torch.ops.quantized_decomposed
    codes = decomposed.quantize_per_channel(weight, scale, zero, 0, lo, hi, dtype)
    return decomposed.dequantize_per_channel(codes, scale, zero, 0, lo, hi, dtype)


def _weight_qparams(module: nn.Module, layer: QuantizedMixin) -> None:
    """Register ``weight`` (hard-quantized), ``w_scale`` / ``w_zero`` per output channel, ``w_range``."""
    wq = layer.weight_q
    assert isinstance(wq, UniformQuantizer)
    weight = layer.effective_weight().detach()
    channels = weight.shape[0]
    module.register_buffer("weight", weight)
    module.register_buffer("w_scale", wq.scale.detach().float().reshape(-1).expand(channels).clone())
    zero = wq.zero_point.detach().round().to(torch.int32).reshape(-1).expand(channels).clone()
    module.register_buffer("w_zero", zero)
    module.w_range = _qdq_range(wq.symmetric)


class QDQEmbedding(nn.Module):
    """The export form of a ``QEmbedding``: its table as 8-bit codes (per row) dequantized, then gathered."""

    def __init__(self, layer: QEmbedding, ops: Ops = "onnx") -> None:
        super().__init__()
        self.ops, self.args = ops, embedding_args(layer)
        _weight_qparams(self, layer)

    def forward(self, ids: Tensor) -> Tensor:
        table = _weight_qdq(self.weight, self.w_scale, self.w_zero, self.w_range, self.ops)
        return nn.functional.embedding(ids, table, self.args["padding_idx"])


class QDQLayer(nn.Module):
    """The export form of a ``QLinear`` / ``QConv2d``: 8-bit QDQ around input and weight."""

    def __init__(self, layer: QuantizedMixin, ops: Ops = "onnx") -> None:
        super().__init__()
        wq, iq = layer.weight_q, layer.input_q
        assert isinstance(wq, UniformQuantizer) and iq is not None
        inner = iq.inner if isinstance(iq, NoisyBias) else iq
        assert isinstance(inner, UniformQuantizer)
        _weight_qparams(self, layer)
        weight = self.weight
        bias = layer.bias.detach().clone() if layer.bias is not None else None  # type: ignore[attr-defined]
        noise = iq.noise.detach() if isinstance(iq, NoisyBias) else None
        if noise is not None and not iq.folded:  # inner(x + N) - N: the -N goes through the layer into the bias
            correction = weight @ noise
            bias = -correction if bias is None else bias - correction
        self.ops = ops
        self.conv = conv_args(layer) if isinstance(layer, QConv2d) else None
        self.register_buffer("bias", bias)
        # SmoothQuant's run-time x / s as x * (1 / s): a multiply, which the compiled kernels run faster than a division
        self.register_buffer("inverse_smooth", None if layer.smooth is None else 1 / layer.smooth.detach().clone())
        self.register_buffer("noise", noise)
        scale, x_zero = float(inner.scale.reshape(())), int(round(float(inner.zero_point.reshape(()))))
        self.x_qparams = (scale, x_zero)  # Python numbers: constants in the exported graph
        self.register_buffer("x_scale", torch.tensor(scale))
        self.register_buffer("x_zero", torch.tensor(x_zero, dtype=torch.int32))
        self.x_range = _qdq_range(inner.symmetric)
        self.x_clip = ((inner.qmin - x_zero) * scale, (inner.qmax - x_zero) * scale) if inner.bits < 8 else None

    @torch.no_grad()
    def fold_batchnorm(self, bn: nn.modules.batchnorm._BatchNorm) -> bool:
        """Absorb the (eval-mode) batch norm after this convolution: with ``s = gamma / sqrt(var + eps)``
        the weight grid scales per output channel (``W s`` on the grid of step ``step * s``, exactly) and
        the bias becomes ``beta + (b - mean) s``. Not done (False) when some ``s <= 0``."""
        s = bn_scale(bn).to(self.weight)
        if bool((s <= 0).any()):
            return False
        self.weight.mul_(s.view(-1, *[1] * (self.weight.dim() - 1)))
        self.w_scale.mul_(s)
        self.bias = folded_bias(bn, self.bias, s)
        return True

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(input, weight) on their 8-bit grids."""
        weight = _weight_qdq(self.weight, self.w_scale, self.w_zero, self.w_range, self.ops)
        if self.ops == "onnx":
            lo, hi, _ = self.x_range
            return torch.fake_quantize_per_tensor_affine(x, self.x_scale, self.x_zero, lo, hi), weight
        return _activation_qdq(x, self.x_qparams, self.x_range, self.ops), weight

    def forward(self, x: Tensor) -> Tensor:
        if self.inverse_smooth is not None:
            x = x * self.inverse_smooth
        if self.noise is not None:
            x = x + self.noise
        if self.x_clip is not None:
            x = x.clamp(*self.x_clip)
        x, w = self._quantize(x)
        if self.conv is None:
            return nn.functional.linear(x, w, self.bias)
        args = self.conv
        return nn.functional.conv2d(x, w, self.bias, args["stride"], args["padding"], args["dilation"], args["groups"])


def _activation_qdq(x: Tensor, qparams: tuple[float, int], qrange: tuple[int, int, torch.dtype], ops: Ops) -> Tensor:
    """``x`` through an 8-bit per-tensor quantize / dequantize pair with constant ``(scale, zero point)``."""
    (scale, zero), (lo, hi, dtype) = qparams, qrange
    if ops == "onnx":
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, lo, hi)
    decomposed = torch.ops.quantized_decomposed
    codes = decomposed.quantize_per_tensor(x, scale, zero, lo, hi, dtype)
    return decomposed.dequantize_per_tensor(codes, scale, zero, lo, hi, dtype)


def activation_unsupported(layer: QuantizedActivation) -> str | None:
    """Why ``layer``'s quantizer cannot be exported as an 8-bit QDQ pair (None when it can)."""
    q = layer.quantizer
    if not isinstance(q, UniformQuantizer) or q.dynamic or q.granularity != "tensor" or q.binary or q.bits > 8:
        return "the activation is not quantized statically per tensor in at most 8 bits"
    return None


class QDQActivation(nn.Module):
    """The export form of a :class:`~bitsmith.nn.QOutput` / :class:`~bitsmith.nn.QInput`: an 8-bit QDQ pair after
    (or before) the inner layer; a grid of fewer bits is clipped to its range first."""

    def __init__(self, layer: QuantizedActivation, ops: Ops = "onnx") -> None:
        super().__init__()
        q = layer.quantizer
        assert isinstance(q, UniformQuantizer)
        self.inner, self.ops, self.before = layer.inner, ops, isinstance(layer, QInput)
        scale, zero = float(q.scale.reshape(())), int(round(float(q.zero_point.reshape(()))))
        self.qparams, self.qrange = (scale, zero), _qdq_range(q.symmetric)
        self.clip = ((q.qmin - zero) * scale, (q.qmax - zero) * scale) if q.bits < 8 else None

    def quantize(self, x: Tensor) -> Tensor:
        if self.clip is not None:
            x = x.clamp(*self.clip)
        return _activation_qdq(x, self.qparams, self.qrange, self.ops)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(self.quantize(x)) if self.before else self.quantize(self.inner(x))


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the layers with quantized weights: the ones a backend can run in integer kernels."""
    return [name for name, module in model.named_modules()
            if isinstance(module, (QLinear, QConv2d, QEmbedding)) and module.weight_q is not None]  # fmt: skip


@torch.no_grad()
def deployable(model: nn.Module, ops: Ops = "onnx") -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``model`` with QDQ export layers and every other compressed module made plain;
    returns it and ``{layer: why it stays float}`` (also named in a warning)."""
    if ops == "pt2e":
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed ops)
    model = copy.deepcopy(model).eval()
    fallbacks: dict[str, str] = {}
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedActivation)]:
        reason = activation_unsupported(module)
        if reason is not None:
            fallbacks[name] = reason
        set_submodule(
            model, name, module.inner if reason else QDQActivation(module, ops)
        )  # before the batch-norm trace
    exported: dict[str, nn.Module] = {}
    for name in quantized_layers(model):
        module = model.get_submodule(name)
        reason = unsupported(module, ops)
        if reason is None:
            kind = (
                QDQEmbedding
                if isinstance(module, QEmbedding)
                else QDQSplitLayer
                if _channel_split(module)
                else QDQLayer
            )
            exported[name] = kind(module, ops)
        else:
            fallbacks[name] = reason
    convs = [name for name, qdq in exported.items() if isinstance(qdq, QDQLayer) and qdq.conv is not None]
    for conv, bn in conv_bn_pairs(model, convs).items():  # traced before any module is replaced
        if exported[conv].fold_batchnorm(model.get_submodule(bn)):
            set_submodule(model, bn, nn.Identity())
    for name, qdq in exported.items():
        set_submodule(model, name, qdq)
    if fallbacks:
        names = ", ".join(f"{name} ({why})" for name, why in fallbacks.items())
        warnings.warn(f"deployed in float, not integer: {names}", stacklevel=3)
    return strip(model), fallbacks


class KeywordInputs(nn.Module):
    """Positional inputs -> keyword call; the first output (``last_hidden_state`` of an HF encoder)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: Tensor) -> Tensor:
        out = self.model(**dict(zip(self.names, tensors, strict=True)))
        return out if isinstance(out, Tensor) else out[0]


class Runner:
    """A deployed model, called like the original: a tensor in, a tensor out; or keywords in: tokenizer output
    gives an object with ``.last_hidden_state`` (as a Hugging Face encoder answers), other keywords (a noise
    predictor's ``sample`` and ``timestep``) the tensor."""

    inputs: list[str]
    training = False  # the evaluation helpers switch train/eval modes; a deployed model has none

    def _forward(self, tensors: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def __call__(self, *tensors: Tensor, **keywords: Tensor) -> Any:
        if tensors:  # positional: in the exported inputs' order (an image; a noise predictor's sample, time step)
            return self._forward(list(tensors))
        missing = [name for name in self.inputs if name not in keywords]
        if missing:
            raise ValueError(f"the deployed model needs the inputs {self.inputs}; missing {missing}")
        out = self._forward([keywords[name] for name in self.inputs])
        return SimpleNamespace(last_hidden_state=out) if "input_ids" in self.inputs else out

    def eval(self) -> Runner:
        return self

    def train(self, mode: bool = True) -> Runner:
        return self
