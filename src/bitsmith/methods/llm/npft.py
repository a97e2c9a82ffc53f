"""NPFT (Wang et al., 2024): noise-perturbation fine-tuning makes an LLM robust to its later quantization.

Spec: ``shared/methods/npft.md``; official code ``SimWangArizona/NPFT`` (``src/outliers``, ``src/noise``,
``LoRA_FT_llama.py``). Per round ("epoch" in the official loop): the LoRA adapters are merged into the clean
base, the empirical Fisher diagonal (squared gradients of the next-token loss) of every selected weight is
accumulated over ``fisher_batches`` calibration windows, each layer's top ``sensitivity`` percent entries are
its outliers; for every output row holding outliers, ``u ~ U(min, max)`` of that row's outlier values, minus
its mean, is added to the frozen base weights there; the LoRA adapters (the ``peft`` library: rank 8,
alpha 32, dropout 0.05 on the selected Linears) are then trained on the calibration windows with the noise in
place. The clean base comes back after each round; at the end the adapters are merged into it, so the result
is an ordinary model for any quantizer that follows (``[npft, rtn]``). ``noise: false`` is plain LoRA with the
same steps (the baseline).

Deviations: the fine-tune runs inside the method's calibration (bitsmith's training loop is for classifiers;
an LLM loop is its own issue), on the calibration windows (the official code uses C4), for a stated
``steps`` budget split evenly over ``rounds`` with AdamW at ``lr`` 1e-4 (the official 5e-6 with weight decay
0.01, batch 2 runs for epochs of C4 on 7B models; with a CPU budget of a hundred steps it would not move).
Fisher-only outliers (the README runs' ``--not_using_threshold``; no IQR magnitude outliers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.data import token_windows
from bitsmith.method import Method, register_method
from bitsmith.progress import log


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids, labels=ids).loss


def fisher_diagonal(model: nn.Module, layers: dict[str, nn.Linear], windows: list[Tensor]) -> dict[str, Tensor]:
    """Mean squared gradient of the next-token loss w.r.t. each layer's weight, one window at a time."""
    saved = {name: layer.weight.requires_grad for name, layer in layers.items()}
    fisher = {name: torch.zeros_like(layer.weight) for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.weight.requires_grad_(True)
        for ids in windows:
            model.zero_grad(set_to_none=True)
            lm_loss(model, ids).backward()
            for name, layer in layers.items():
                fisher[name] += layer.weight.grad.detach().pow(2) / len(windows)  # type: ignore[union-attr]
    finally:
        for name, layer in layers.items():
            layer.weight.grad = None
            layer.weight.requires_grad_(saved[name])
    return fisher


def outlier_mask(fisher: Tensor, percent: float) -> Tensor:
    """The top ``percent`` % entries of one layer's Fisher diagonal (at least one)."""
    count = max(1, round(fisher.numel() * percent / 100))
    mask = torch.zeros(fisher.numel(), dtype=torch.bool)
    mask[torch.topk(fisher.reshape(-1), count).indices] = True
    return mask.reshape(fisher.shape)


def outlier_noise(weight: Tensor, mask: Tensor, generator: torch.Generator) -> Tensor:
    """Zero-mean uniform noise at the outliers: per row, ``U(min, max)`` of the row's outlier values minus its
    mean (the official ``add_noise``), zero elsewhere."""
    noise = torch.zeros_like(weight)
    for row in torch.nonzero(mask.any(1)).squeeze(1).tolist():
        values = weight[row][mask[row]]
        u = values.min() + (values.max() - values.min()) * torch.rand(values.numel(), generator=generator)
        noise[row, mask[row]] = u - u.mean()
    return noise


@register_method("npft")
@dataclass
class NPFT(Method):
    """LoRA fine-tuning with zero-mean noise on the Fisher-sensitive weights, merged: robust to later RTN."""

    description = "NPFT: LoRA fine-tune with uniform noise on the top-Fisher weights, merged (robust to later RTN)"

    steps: Annotated[int, Field(ge=1)] = 120
    rounds: Annotated[int, Field(ge=1)] = 3  # outliers and noise re-drawn at the start of each
    lr: Annotated[float, Field(gt=0)] = 1e-4
    rank: Annotated[int, Field(ge=1)] = 8
    alpha: Annotated[float, Field(gt=0)] = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    sensitivity: Annotated[float, Field(gt=0, le=100)] = 0.05  # percent of each layer's weights
    fisher_batches: Annotated[int, Field(ge=1)] = 4  # calibration windows for the Fisher diagonal
    noise: bool = True  # False: plain LoRA with the same steps (the baseline)
    seed: int = 0

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        self._names = [n for n in self.where.resolve(model) if isinstance(model.get_submodule(n), nn.Linear)]
        if not self._names:
            raise ValueError("npft: `where` selects no Linear layers to adapt")
        return {}

    def calibrate(self, model: nn.Module, batches: Any) -> None:
        from peft import LoraConfig, get_peft_model

        windows = token_windows(list(batches))
        if not windows:
            raise ValueError("npft needs calibration windows to fine-tune on")
        torch.manual_seed(self.seed)
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self._names,
                            bias="none")  # fmt: skip
        peft_model = get_peft_model(model, config)
        bases = {n: peft_model.base_model.model.get_submodule(n).base_layer for n in self._names}
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=self.lr)
        generator = torch.Generator().manual_seed(self.seed)
        per_round = math.ceil(self.steps / self.rounds)
        step, self.history = 0, []
        for round_index in range(self.rounds):
            clean = {n: layer.weight.detach().clone() for n, layer in bases.items()}
            if self.noise:
                self._perturb(peft_model, bases, windows, generator)
            peft_model.train()
            for _ in range(min(per_round, self.steps - step)):
                ids = windows[step % len(windows)]
                loss = lm_loss(peft_model, ids)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                self.history.append(float(loss))
            with torch.no_grad():
                for name, layer in bases.items():
                    layer.weight.copy_(clean[name])
            recent = self.history[-per_round:]
            log.info(f"npft: round {round_index + 1}/{self.rounds}, step {step}/{self.steps}, "
                     f"loss {sum(recent) / len(recent):.4f}")  # fmt: skip
        peft_model.merge_and_unload()
        model.eval()

    def _perturb(self, peft_model: nn.Module, bases: dict[str, nn.Linear], windows: list[Tensor],
                 generator: torch.Generator) -> None:  # fmt: skip
        """Outliers of the merged model (clean base + adapters), then noise into the base weights there."""
        peft_model.eval()
        peft_model.merge_adapter()
        try:
            fisher = fisher_diagonal(peft_model, bases, windows[: self.fisher_batches])
        finally:
            peft_model.unmerge_adapter()
        with torch.no_grad():
            for name, layer in bases.items():
                mask = outlier_mask(fisher[name], self.sensitivity)
                layer.weight.add_(outlier_noise(layer.weight, mask, generator))
