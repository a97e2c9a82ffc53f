"""LoRA fine-tuning of a decoder LLM on token windows (the ``peft`` library), shared by PAT and the post-hoc
pruning baseline so that both get the same adapters, optimizer and step budget."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bitsmith.progress import log


@contextlib.contextmanager
def only_trainable(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Inside this block only ``params`` require gradients (none when empty); every flag is restored after."""
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in saved:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


@dataclass
class LoraSettings:
    steps: int
    lr: float
    rank: int
    alpha: float
    dropout: float
    max_grad_norm: float


def lora_finetune(
    model: nn.Module,
    windows: list[Tensor],
    settings: LoraSettings,
    extra_groups: list[dict] | None = None,
    extra_loss: Callable[[], Tensor] | None = None,
    before_step: Callable[[int], None] | None = None,
    what: str = "fine-tune",
) -> list[float]:
    """LoRA adapters on every Linear except the LM head, ``settings.steps`` AdamW steps of the next-token loss
    (one window each, cycling), gradients clipped; ``extra_groups`` are trained too (their own ``lr``) and
    ``extra_loss()`` is added. The adapters are merged at the end (``model`` is a plain model again)."""
    from peft import LoraConfig, get_peft_model

    if not windows:
        raise ValueError(f"{what}: no calibration windows to fine-tune on")
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none")  # fmt: skip
    peft_model = get_peft_model(model, config)
    groups = [{"params": [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n],
               "lr": settings.lr}, *(extra_groups or [])]  # fmt: skip
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    trained = [p for g in groups for p in g["params"]]
    history: list[float] = []
    peft_model.train()
    for step in range(settings.steps):
        if before_step is not None:
            before_step(step)
        ids = windows[step % len(windows)]
        loss = peft_model(input_ids=ids, labels=ids).loss
        if extra_loss is not None:
            loss = loss + extra_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, settings.max_grad_norm)
        optimizer.step()
        history.append(float(loss.detach()))
        if (step + 1) % 10 == 0 or step + 1 == settings.steps:
            log.info(f"{what}: step {step + 1}/{settings.steps}, loss {history[-1]:.4f}")
    peft_model.merge_and_unload()
    model.eval()
    return history
