"""Quantization-aware training baselines: STE fake-quant and LSQ (Esser et al., ICLR 2020).

Spec: ``shared/methods/qat.md``. ``prepare`` attaches the quantizers, ``calibrate`` sets the activation
ranges (STE: moving-average min-max, then frozen) or LSQ's initial steps, and training (a recipe's
``train`` section, or your own loop) learns through them:

* ``ste`` — weights per output channel with the step from their min-max at every forward; the
  gradient passes straight through inside the range (clipped STE).
* ``lsq`` — a trainable step per output channel (weights) and per tensor (activations), gradient
  scaled by ``1/sqrt(N * Q_P)``, initialised to ``2 mean|v| / sqrt(Q_P)``.

Activation quantizers are unsigned when the calibration inputs are non-negative (after ReLU), signed
otherwise. Deviations / not done yet: STE activations use the min-max of each batch (dynamic
per-tensor) instead of the spec's moving average frozen after a warm-up (freezing it at calibration
time clipped the activations of the trained model: 52% vs 100% on a toy task).

Batch-norm folding (``fold_bn``, default on): a convolution whose only consumer is a batch norm
(found by ``torch.fx``) quantizes ``W * gamma / sqrt(var + eps)`` during training
(``bitsmith.quant.bnfold``); the batch-norm statistics freeze after ``freeze_bn`` of the epochs
(the ``schedule`` hook), and ``finalize`` folds the pair into one quantized convolution plus a bias.
Models that ``torch.fx`` cannot trace are trained without folding (a warning says so).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from bitsmith.method import Method, eval_mode, register_method, run_forward
from bitsmith.quant.bnfold import BatchNormFolded, conv_bn_pairs, fold_batchnorm
from bitsmith.quant.layers import attach, input_channel_axis
from bitsmith.quant.uniform import Bits, UniformQuantizer


@register_method("qat")
@dataclass
class QAT(Method):
    """Uniform fake quantization trained end to end; pair it with a ``train`` section."""

    description = "quantization-aware training with STE fake-quant or LSQ learned steps"

    w_bits: Bits | None = 4
    a_bits: Bits | None = 8
    step: Literal["ste", "lsq"] = "lsq"
    fold_bn: bool = True
    freeze_bn: Annotated[float, Field(ge=0.0, le=1.0)] = 0.7

    def __post_init__(self) -> None:
        super().__post_init__()
        self._layers: dict[str, dict[str, Any]] = {}
        self._pairs: dict[str, str] = {}

    def _weight_q(self, name: str, layer: nn.Module, overrides: dict[str, Any]) -> UniformQuantizer | None:
        c = self.layer_config(overrides)
        if c["w_bits"] is None:
            return None
        if c["step"] == "ste":
            return UniformQuantizer(c["w_bits"], True, "channel", ch_axis=0, dynamic=True)
        return UniformQuantizer(c["w_bits"], True, "channel", ch_axis=0, step="learned")

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        self._layers = self.where.resolve(model)
        if self.fold_bn:
            convs = [n for n in self._layers if isinstance(model.get_submodule(n), nn.Conv2d)]
            self._pairs = conv_bn_pairs(model, convs) if convs else {}
            if convs and not self._pairs and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
                warnings.warn("qat: no conv -> batch-norm pair found (or the model cannot be traced by "
                              "torch.fx); training without batch-norm folding", stacklevel=2)  # fmt: skip
        specs = attach(model, self.where, self._weight_q, None)
        for conv, bn in self._pairs.items():
            layer = model.get_submodule(conv)
            if layer.weight_q is not None:
                layer.weight_q = BatchNormFolded(layer.weight_q, model.get_submodule(bn))
        return specs

    def schedule(self, model: nn.Module, epoch: int, epochs: int) -> bool:
        """Freeze the folded batch norms' statistics for the last ``1 - freeze_bn`` of the epochs."""
        if self._pairs and epoch >= max(1, round(self.freeze_bn * epochs)):
            for conv in self._pairs:
                model.get_submodule(conv).weight_q.freeze()
        return False

    def finalize(self, model: nn.Module) -> None:
        """Fold each batch norm into its quantized convolution (``W_fold``, ``b_fold``)."""
        for conv, bn in self._pairs.items():
            fold_batchnorm(model.get_submodule(conv), model.get_submodule(bn))
        self._pairs = {}

    @torch.no_grad()
    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        """Build the activation quantizers from what the calibration batches feed each layer."""
        layers = {n: model.get_submodule(n) for n in self._layers}
        signed: dict[str, bool] = {}
        handles = [
            layer.register_forward_pre_hook(
                lambda m, a, n=n: signed.__setitem__(n, signed.get(n, False) or bool((a[0] < 0).any()))
            )
            for n, layer in layers.items()
        ]
        batches = list(batches)
        with eval_mode(model):
            try:
                run_forward(model, batches[0])
            finally:
                for handle in handles:
                    handle.remove()
            for name, layer in layers.items():
                c = self.layer_config(self._layers[name])
                if c["a_bits"] is None:
                    continue
                lsq = c["step"] == "lsq"
                layer.input_q = UniformQuantizer(
                    c["a_bits"], signed[name], "tensor", ch_axis=input_channel_axis(layer),
                    step="learned" if lsq else "calibrated", dynamic=not lsq, lsq_batch_dim=True,
                )  # fmt: skip
            run_forward(model, batches[0])  # LSQ: the first pass initialises the steps
