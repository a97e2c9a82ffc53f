"""Post-hoc hidden-dimension pruning of a decoder LLM, then LoRA fine-tuning: the baselines PAT is measured
against (spec: ``shared/methods/pat.md``, "post-hoc hidden-channel pruning by magnitude / activation norm
followed by the same number of fine-tune steps").

The ``target`` highest-scoring hidden channels are kept: ``magnitude`` scores a channel by the L2 norm of every
weight that leaves with it (embedding column, attention / FFN output rows, q / k / v / gate / up input columns,
an untied LM head's column), ``activation`` by the RMS of the residual stream over all layers and the first
``score_windows`` calibration windows. The others are removed (``bitsmith.hidden``, norms compensated), and the
smaller model gets the same LoRA fine-tune as PAT (``bitsmith.finetune``: rank, alpha, learning rate, steps,
gradient clipping).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from bitsmith.data import token_windows
from bitsmith.finetune import LoraSettings, lora_finetune
from bitsmith.hidden import channel_scores, hidden_topology, keep_top, remove_hidden_channels
from bitsmith.method import Method, register_method


@register_method("hidden-prune")
@dataclass
class HiddenPrune(Method):
    """Keep the top hidden channels by weight magnitude or activation norm, remove the rest, LoRA fine-tune."""

    description = "post-hoc hidden-dimension pruning (magnitude / activation norm) + LoRA fine-tune (PAT's baseline)"
    doc_page = "pat"

    target: Annotated[int, Field(ge=1)] = 432
    score: Literal["magnitude", "activation"] = "magnitude"
    score_windows: Annotated[int, Field(ge=1)] = 8
    steps: Annotated[int, Field(ge=0)] = 200
    lr: Annotated[float, Field(gt=0)] = 1e-4
    rank: Annotated[int, Field(ge=1)] = 8
    alpha: Annotated[float, Field(gt=0)] = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    max_grad_norm: Annotated[float, Field(gt=0)] = 0.3

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        hidden_topology(model)
        hidden = model.get_input_embeddings().weight.shape[1]
        if self.target > hidden:
            raise ValueError(f"hidden-prune: target {self.target} is above the hidden size {hidden}; use 1..{hidden}")
        return {}

    def calibrate(self, model: nn.Module, batches: Any) -> None:
        windows = token_windows(list(batches))
        with torch.no_grad():
            self.scores = channel_scores(model, self.score, windows[: self.score_windows])
        remove_hidden_channels(model, keep_top(self.scores, self.target))
        if self.steps:
            settings = LoraSettings(self.steps, self.lr, self.rank, self.alpha, self.dropout, self.max_grad_norm)
            self.history = lora_finetune(model, windows, settings, what="hidden-prune")
