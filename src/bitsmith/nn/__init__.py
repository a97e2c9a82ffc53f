"""Compressed modules: ``QLinear`` / ``QConv2d`` / ``QEmbedding`` (quantizers + mask around the float weight,
:mod:`bitsmith.nn.quantized`), ``LowRankLinear`` / ``LowRankConv2d`` (two factors, :mod:`bitsmith.nn.low_rank`),
``QOutput`` / ``QInput`` (activation quantizers around a layer without weights, :mod:`bitsmith.nn.activation`),
``LSTMAttention`` (FAR's multi-head LSTM in place of an attention block, :mod:`bitsmith.nn.recurrent`),
``PrunedBlock`` (a token scorer and merge in front of a block, :mod:`bitsmith.nn.tokens`), ``PrunedEncoder``
(tokens dropped inside a BERT-style encoder, :mod:`bitsmith.nn.encoder_tokens`),
``RotatedLinear`` (a linear layer behind a Hadamard rotation of its input, :mod:`bitsmith.nn.rotated`),
plus ``strip()`` back to plain torch modules and the registry that rebuilds them from a checkpoint."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bitsmith.nn.activation import QInput, QOutput, QuantizedActivation
from bitsmith.nn.base import COMPRESSED, as_linear, conv_args, embedding_args, is_hf_conv1d, register_compressed
from bitsmith.nn.encoder_tokens import PrunedEncoder
from bitsmith.nn.low_rank import LowRankConv2d, LowRankLinear, LowRankMixin
from bitsmith.nn.quantized import QConv2d, QEmbedding, QLinear, QuantizedMixin
from bitsmith.nn.recurrent import LSTMAttention
from bitsmith.nn.rotated import RotatedLinear
from bitsmith.nn.tokens import PrunedBlock
from bitsmith.swap import set_submodule

__all__ = [
    "COMPRESSED", "LSTMAttention", "LowRankConv2d", "LowRankLinear", "LowRankMixin", "QConv2d", "QEmbedding", "QInput", "QLinear",
    "PrunedBlock", "PrunedEncoder", "QOutput", "RotatedLinear", "QuantizedActivation", "QuantizedMixin", "as_linear", "build_compressed", "compressed_layers",
    "conv_args", "embedding_args", "is_compressed", "is_hf_conv1d", "register_compressed", "strip",
]  # fmt: skip


def is_compressed(module: nn.Module) -> bool:
    return isinstance(module, (QuantizedMixin, LowRankMixin)) or type(module) in COMPRESSED.values()


def compressed_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer name: spec}`` of every compressed module, parents before children."""
    return {name: m.spec() for name, m in model.named_modules() if is_compressed(m)}  # type: ignore[union-attr]


def build_compressed(module: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """The compressed module described by ``spec``, built around the plain ``module``."""
    kind = spec.get("type")
    if kind not in COMPRESSED:
        raise ValueError(f"unknown compressed layer type {kind!r}; known: {sorted(COMPRESSED)}")
    return COMPRESSED[kind].from_spec(module, spec)  # type: ignore[attr-defined]


@torch.no_grad()
def strip(model: nn.Module, merge_low_rank: bool = False) -> nn.Module:
    """Replace every compressed module by plain torch modules (in place; returns ``model``).

    Quantized layers become ``nn.Linear`` / ``nn.Conv2d`` holding the hard-quantized, masked weight;
    input quantizers are dropped. Low-rank layers become ``nn.Sequential(down, up)`` (or one merged
    dense layer with ``merge_low_rank=True``).
    """
    names = [name for name, m in model.named_modules() if is_compressed(m)]
    for name in sorted(names, key=lambda n: -n.count(".")):  # children first
        module = model.get_submodule(name) if name else model
        low_rank = isinstance(module, LowRankMixin)
        plain = module.to_float(merge_low_rank) if low_rank else module.to_float()  # type: ignore[union-attr]
        if not name:
            return plain
        set_submodule(model, name, plain)
    return model


def rebuild(model: nn.Module, layers: dict[str, dict[str, Any]]) -> nn.Module:
    """Re-create the compressed layers of a ``{name: spec}`` map on a plain model (parents first)."""
    for name in sorted(layers, key=lambda n: n.count(".")):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"layer {name!r} of the compressed-layer map is not in the model; "
                "was it saved from a different architecture?"
            ) from None
        set_submodule(model, name, build_compressed(module, layers[name]))
    return model
