"""Batch-norm folding for quantization-aware training (spec: ``shared/methods/qat.md``).

A convolution followed by batch norm is deployed as one convolution with ``W_fold = W * s`` and
``b_fold = beta - mu * s``, ``s = gamma / sqrt(var + eps)``, so it is ``W_fold`` that must be quantized.
During training :class:`BatchNormFolded` wraps the convolution's weight quantizer and computes
``Q(W * s) / s``: the convolution's output divided by ``s`` then goes through the real batch norm,
which keeps normalising with batch statistics (Jacob et al. 2018 with the correction of
``torch.ao``'s ConvBn QAT modules). Once the statistics are frozen (running statistics in the batch
norm), the pair computes exactly ``conv(x, Q(W_fold)) + b_fold``. :func:`fold_batchnorm` makes that
permanent: the convolution holds ``W_fold`` with the inner quantizer (its steps are already in the
folded domain) and the batch norm becomes a plain ``+ b_fold``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.quant.base import Quantizer, WrappedQuantizer


def bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """``gamma / sqrt(running_var + eps)`` per channel, kept away from zero (sign preserved)."""
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    scale = gamma / torch.sqrt(bn.running_var + bn.eps)
    return torch.where(scale >= 0, scale.clamp(min=1e-8), scale.clamp(max=-1e-8))


def folded_bias(bn: nn.modules.batchnorm._BatchNorm, bias: Tensor | None, scale: Tensor) -> Tensor:
    """``beta + (b - mean) * s``: the bias of a convolution with its batch norm folded in."""
    bias = bias if bias is not None else torch.zeros_like(scale)
    return (bn.bias if bn.bias is not None else 0) + (bias - bn.running_mean) * scale


class BatchNormFolded(WrappedQuantizer):
    """``Q(W * s) / s`` for the weight of a convolution whose output feeds ``bn``; transient (training only)."""

    kind = "bn-folded"

    def __init__(self, inner: Quantizer, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "bn", bn)  # a reference, not a submodule: the model owns the batch norm
        self.register_buffer("frozen", torch.tensor(False))  # in the state dict: a resumed run stays frozen
        bn.register_forward_pre_hook(self._use_running_statistics)

    def _use_running_statistics(self, bn: nn.Module, args: Any) -> None:
        if bool(self.frozen):
            bn.training = False

    def freeze(self) -> None:
        """From now on the batch norm normalises with (and no longer updates) its running statistics."""
        self.frozen.fill_(True)

    def scale(self, weight: Tensor) -> Tensor:
        return bn_scale(self.bn).view(-1, *[1] * (weight.dim() - 1))

    def forward(self, weight: Tensor) -> Tensor:
        s = self.scale(weight)
        return self.inner(weight * s) / s

    def _not_folded(self, *_: Any) -> Any:
        raise RuntimeError("batch-norm folding is still in training: finalize the qat method (or call "
                           "bitsmith.quant.bnfold.fold_batchnorm) before saving or packing the model")  # fmt: skip

    encode = _not_folded  # type: ignore[assignment]
    decode = _not_folded  # type: ignore[assignment]
    config = _not_folded  # type: ignore[assignment]


class _LayerTracer(torch.fx.Tracer):
    """Keeps every layer (compressed ones too) as one node: only the wiring between layers matters."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        layer = isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm))
        return layer or super().is_leaf_module(m, module_qualified_name)


def conv_bn_pairs(model: nn.Module, names: list[str]) -> dict[str, str]:
    """``{conv name: batch-norm name}`` for the selected convolutions whose only consumer is a batch
    norm, found by tracing the model with ``torch.fx``; ``{}`` when the model cannot be traced."""
    try:
        graph = _LayerTracer().trace(model)
    except Exception:  # noqa: BLE001 - dynamic control flow: no folding, reported by the caller
        return {}
    modules = dict(model.named_modules())
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in names or not isinstance(modules[node.target], nn.Conv2d):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module":
            bn = modules[users[0].target]
            affine = isinstance(bn, nn.BatchNorm2d) and bn.affine and bn.track_running_stats
            if affine and bn.num_features == modules[node.target].out_channels:
                pairs[node.target] = users[0].target
    return pairs


def freeze_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Use (and stop updating) the running statistics, even when the model is in training mode."""
    if not getattr(bn, "_bitsmith_frozen", False):
        bn.register_forward_pre_hook(lambda module, args: setattr(module, "training", False))
        bn._bitsmith_frozen = True  # type: ignore[attr-defined]


@torch.no_grad()
def fold_batchnorm(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Make the folding permanent: ``conv`` gets ``W_fold`` and the inner quantizer, ``bn`` becomes
    ``x + b_fold`` (unit scale, zero mean, variance ``1 - eps``), so the architecture is unchanged."""
    folded = conv.weight_q
    s = bn_scale(bn)
    if isinstance(folded, BatchNormFolded):
        conv.weight_q = folded.inner
    b_fold = folded_bias(bn, conv.bias, s)
    conv.weight.mul_(s.view(-1, *[1] * (conv.weight.dim() - 1)))
    if conv.bias is not None:
        conv.bias.zero_()
    bn.running_mean.zero_()
    bn.running_var.fill_(1 - bn.eps)
    if bn.weight is not None:
        bn.weight.fill_(1.0)
    if bn.bias is not None:
        bn.bias.copy_(b_fold)
    freeze_batchnorm(bn)
