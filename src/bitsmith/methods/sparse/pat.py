"""PAT (Liu et al., 2024, "PAT: Pruning-Aware Tuning for Large Language Models"): hybrid sparsification modules
with one globally shared trainable mask of the hidden dimension, trained with LoRA, then folded into the
adjacent linears and the masked channels removed.

Spec: ``shared/methods/pat.md``; official code ``kriskrisliu/PAT_Pruning-Aware-Tuning`` (``DimDownModule.py``,
``script/merge_dimdown.py``). A Hybrid Sparsification Module (HSM) on the residual stream computes
``v * m(t) * (x + U2 U1 x)`` (``U1`` r x d Kaiming, ``U2`` d x r zeros, ``v`` per-channel scale 1); one HSM after
every residual writer (each block's attention output and FFN output projections) and one after the token
embedding, which owns the shared mask logits (init 0). Mask schedule at step t of ``steps``:
``m(t) = sigmoid(T(t) logits) + max(0.5 - t / steps, 0)`` with ``T(t) = 1 / (1 - ln t / ln steps + 1e-6)``; the
logits are frozen (detached) after ``0.8 steps``; the final mask is ``round(sigmoid(1e6 logits))``. Losses added
to the next-token loss: ``10 |sum binarize(logits) - D| / D`` (straight-through binarization) plus
``mean((l - 0.5)^2 | l > 0) + mean((l + 0.5)^2 | l <= 0)``, and every HSM's identity loss
``MSE(U1 U1^T, I_r)``. The base linears get LoRA adapters (the ``peft`` library). At the end the adapters are
merged, every HSM is folded into the linear before it (``W <- diag(v)(I + U2 U1) W``), and the masked channels
are deleted (``bitsmith.hidden``): a smaller dense model, exact against the masked one.

Deviations: the fine-tune runs inside calibration on the calibration windows for a CPU budget of ``steps``
(the paper: 3 epochs of LaMini-instruction, global batch 128), AdamW at ``lr`` 1e-4 for LoRA and the HSMs and
``mask_lr`` 1e-2 for the mask logits (the paper's single 5e-5 with warm-up and cosine would not move the mask in
a few hundred steps); LoRA rank 8, alpha 16 (paper: 20 / 4). With a tied LM head (SmolLM2) the embedding's HSM
is the mask alone (no transform or scale: folding one into the shared table would change the LM head). If the
trained mask does not keep exactly ``target`` channels, the ``target`` highest logits are kept (the count before
is logged). Empty means in the polarization loss count as zero (the official code's would be NaN).

Deviation (measured): while the logits learn, logistic noise of scale ``mask_noise`` (default 2; 0 is the paper's
deterministic mask), drawn once per step and shared by every HSM, is added before the sigmoid (a binary-concrete
relaxation). Why: the residual stream is RMS-normalised, so the loss is invariant to scaling every channel
together and its gradient on the mask sums to zero over the channels; it says which channels want a larger
gain, not which ones matter. On the suite's model with 16 unused channels the paper's mask kept all 16 and
dropped 16 used ones (the unused channels, with no gradient, sit mid-ranking). With the noise, dropping a
channel at random costs loss in proportion to its importance, and the mask keeps at most 1 of the 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from bitsmith.data import token_windows
from bitsmith.finetune import LoraSettings, lora_finetune
from bitsmith.hidden import hidden_topology, remove_hidden_channels
from bitsmith.method import Method, register_method
from bitsmith.progress import log
from bitsmith.swap import set_submodule

FREEZE_AT = 0.8


class SharedMask(nn.Module):
    """The trainable hidden-dimension mask logits and PAT's temperature / bias schedule."""

    def __init__(self, hidden: int, steps: int, noise: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(hidden))
        self.steps, self.step, self.hard = steps, 0, False
        self.noise_scale, self._generator = noise, torch.Generator().manual_seed(seed)
        self.noise = torch.zeros(hidden)

    @property
    def frozen(self) -> bool:
        """After ``0.8 steps`` the logits stop learning and the temperature stops rising."""
        return self.step >= FREEZE_AT * self.steps

    def resample(self) -> None:
        """Draw this step's logistic noise, shared by every HSM (none once the logits are frozen)."""
        if self.noise_scale == 0 or self.frozen:
            self.noise = torch.zeros_like(self.noise)
            return
        u = torch.rand(self.noise.shape, generator=self._generator).clamp(1e-6, 1 - 1e-6)
        self.noise = self.noise_scale * (u.log() - (1 - u).log())

    def value(self) -> Tensor:
        if self.hard:
            return (self.logits > 0).to(self.logits.dtype)  # round(sigmoid(1e6 l)): 0 at l == 0
        step = int(FREEZE_AT * self.steps) if self.frozen else self.step
        logits = self.logits.detach() if self.frozen else self.logits
        temperature = 1.0 / (1 - math.log(max(1, step)) / math.log(max(2, self.steps)) + 1e-6)
        bias = max(0.5 - self.step / self.steps, 0.0)
        return torch.sigmoid(temperature * logits + self.noise) + bias

    def loss(self, target: int) -> Tensor:
        """``10 |#kept - D| / D`` (straight-through count) + the pull of every logit towards +-0.5."""
        binary = (self.logits >= 0).to(self.logits.dtype)
        count = (binary - self.logits.detach() + self.logits).sum()  # value: the count; gradient: 1 per logit
        loss = 10 * (count - target).abs() / target
        positive, negative = self.logits[self.logits > 0], self.logits[self.logits <= 0]
        if positive.numel():
            loss = loss + (positive - 0.5).pow(2).mean()
        if negative.numel():
            loss = loss + (negative + 0.5).pow(2).mean()
        return loss


class HSM(nn.Module):
    """``v * m * (x + U2 U1 x)`` after a residual writer; ``transform=False`` keeps the mask alone."""

    def __init__(self, hidden: int, rank: int, mask: SharedMask, transform: bool = True) -> None:
        super().__init__()
        self._mask = [mask]  # shared, registered once (by the embedding's HSM)
        self.transform = transform
        if transform:
            self.down = nn.Parameter(torch.empty(rank, hidden))
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
            self.up = nn.Parameter(torch.zeros(hidden, rank))
            self.scale = nn.Parameter(torch.ones(hidden))

    def forward(self, x: Tensor) -> Tensor:
        mask = self._mask[0].value().to(x.dtype)
        if not self.transform:
            return x * mask
        return (x + F.linear(F.linear(x, self.down), self.up)) * self.scale * mask

    def identity_loss(self) -> Tensor:
        if not self.transform:
            return torch.zeros(())
        return F.mse_loss(self.down @ self.down.T, torch.eye(self.down.shape[0]))

    @torch.no_grad()
    def fold(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``diag(v)(I + U2 U1)`` applied to the outputs of a linear with ``weight`` / ``bias`` (mask excluded)."""
        if not self.transform:
            return weight, bias
        t = self.scale[:, None] * (torch.eye(self.up.shape[0]) + self.up @ self.down)  # (d, d)
        return t @ weight, None if bias is None else t @ bias


class WithHSM(nn.Module):
    """A residual writer (linear or embedding) followed by its HSM."""

    def __init__(self, inner: nn.Module, hsm: HSM, mask: SharedMask | None = None) -> None:
        super().__init__()
        self.inner, self.hsm = inner, hsm
        if mask is not None:
            self.mask = mask  # the owner registers the shared mask

    @property
    def weight(self) -> Tensor:  # Hugging Face reads the embedding's weight (tying, resizing)
        return self.inner.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.hsm(self.inner(x))


@register_method("pat")
@dataclass
class PAT(Method):
    """Pruning-aware tuning: a shared trainable hidden-dimension mask with HSMs and LoRA, then channel removal."""

    description = "PAT: shared trainable hidden-dimension mask + hybrid sparsification modules + LoRA, then removal"

    target: Annotated[int, Field(ge=1)] = 432  # hidden channels kept
    steps: Annotated[int, Field(ge=2)] = 200
    lr: Annotated[float, Field(gt=0)] = 1e-4
    mask_lr: Annotated[float, Field(gt=0)] = 1e-2
    rank: Annotated[int, Field(ge=1)] = 8  # LoRA
    alpha: Annotated[float, Field(gt=0)] = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    hsm_rank: Annotated[int, Field(ge=1)] = 200  # the HSM transform's r ("eff")
    identity_weight: Annotated[float, Field(ge=0)] = 1.0
    max_grad_norm: Annotated[float, Field(gt=0)] = 0.3
    mask_noise: Annotated[float, Field(ge=0)] = 2.0  # logistic noise on the mask while it learns; 0: the paper's
    seed: int = 0

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        topology = hidden_topology(model)
        hidden = model.get_input_embeddings().weight.shape[1]
        if self.target > hidden:
            raise ValueError(f"pat: target {self.target} is above the hidden size {hidden}; use 1..{hidden}")
        torch.manual_seed(self.seed)
        self._mask = SharedMask(hidden, self.steps, self.mask_noise, self.seed)
        embed = model.get_input_embeddings()
        tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is embed.weight
        self._tied = tied
        model.set_input_embeddings(WithHSM(embed, HSM(hidden, self.hsm_rank, self._mask, not tied), self._mask))
        for _, block in topology.blocks(model):
            for name in topology.writers:
                set_submodule(block, name, WithHSM(block.get_submodule(name), HSM(hidden, self.hsm_rank, self._mask)))
        return {}

    def calibrate(self, model: nn.Module, batches: Any) -> None:
        hsms = [m for m in model.modules() if isinstance(m, HSM)]
        hsm_params = [p for h in hsms for p in h.parameters()]

        def extra_loss() -> Tensor:
            return self._mask.loss(self.target) + self.identity_weight * sum(h.identity_loss() for h in hsms)

        def before_step(step: int) -> None:
            self._mask.step = step + 1
            self._mask.resample()

        settings = LoraSettings(self.steps, self.lr, self.rank, self.alpha, self.dropout, self.max_grad_norm)
        groups = [{"params": hsm_params, "lr": self.lr}, {"params": [self._mask.logits], "lr": self.mask_lr}]
        self.history = lora_finetune(model, token_windows(list(batches)), settings, groups, extra_loss, before_step,
                                     "pat")  # fmt: skip
        self._settle_mask()

    @torch.no_grad()
    def _settle_mask(self) -> None:
        """Exactly ``target`` channels: the trained hard mask, or its ``target`` highest logits when it differs."""
        kept = int((self._mask.logits > 0).sum())
        self.trained_kept = kept
        if kept != self.target:
            log.info(f"pat: the trained mask keeps {kept} channels; keeping the {self.target} highest logits")
            order = self._mask.logits.argsort(descending=True)
            self._mask.logits[order[: self.target]] = self._mask.logits[order[: self.target]].clamp(min=1e-3)
            self._mask.logits[order[self.target :]] = self._mask.logits[order[self.target :]].clamp(max=-1e-3)
        self._mask.hard = True

    @torch.no_grad()
    def finalize(self, model: nn.Module) -> None:
        """Fold every HSM into the linear before it, then delete the masked channels."""
        if not hasattr(self, "_mask"):
            return
        self._mask.hard = True
        keep = self._mask.logits > 0
        topology = hidden_topology(model)
        wrapped = model.get_input_embeddings()
        embed = wrapped.inner
        if wrapped.hsm.transform:  # untied: the table's rows are the embedding's outputs
            weight, _ = wrapped.hsm.fold(embed.weight.T, None)
            embed.weight = nn.Parameter(weight.T.contiguous())
        model.set_input_embeddings(embed)
        if self._tied:
            model.lm_head.weight = embed.weight
        for _, block in topology.blocks(model):
            for name in topology.writers:
                module = block.get_submodule(name)
                weight, bias = module.hsm.fold(module.inner.weight, module.inner.bias)
                module.inner.weight = nn.Parameter(weight.contiguous())
                if bias is not None:
                    module.inner.bias = nn.Parameter(bias.contiguous())
                set_submodule(block, name, module.inner)
        remove_hidden_channels(model, keep)
        self.kept = int(keep.sum())
        del self._mask
