"""Sparse attention distillation (Ren, Collins, Hu et al., "From Sparsity to Simplicity: Enabling Simpler Sequential
Replacements via Sparse Attention Distillation"): a pretrained transformer spreads its token dependencies over layers
of different complexity, and layers whose attention is sparse can be replaced by a simpler sequential module at
little cost. This method measures each layer's attention sparsity on the calibration data (normalised entropy of
each query's attention, ``bitsmith.eval.attention``), replaces the ``count`` sparsest layers by FAR's multi-head
LSTMs and distils them as FAR does (``far.py``: block-wise, then the block-output loss; training and pruning too).

``blocks: densest`` replaces the densest layers instead (the paper's contrast). Deviation, stated: the paper's second
step — raising the teacher's sparsity with AViT-style token retention before distilling — is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from bitsmith.method import register_method
from bitsmith.methods.attention.far import FAR


@register_method("sparse-attention-replace")
@dataclass
class SparseAttentionReplace(FAR):
    """FAR on the layers whose attention is sparsest (measured on the calibration data)."""

    description = "Sparse attention distillation: FAR's LSTM replaces the sparsest-attention layers (measured)"
    doc_page = "sparse-attention-replace"

    blocks: list[int] | Literal["all", "sparsest", "densest"] = "sparsest"
    count: Annotated[int, Field(ge=1)] = 2
