"""T-REX vs LoRA (the ``peft`` library) at equal trainable parameters, for ``benchmarks/moe.py``:

* sentiment: MiniLM (all-MiniLM-L6-v2) + a linear head on mean-pooled embeddings, binary sentiment of the
  vaderSentiment movie-review sentences (80 / 20 split, seed 0), one epoch, batch 32; the head is trained in
  every row (its parameters are counted apart);
* language modelling: SmolLM2 adapters trained on the calibration windows, scored on the held-out texts.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.method import build_method, compress
from bitsmith.methods.moe.trex import intuition_prior, semantic_prior

R1, R2 = 4, 4
BATCH, LR, SEED = 32, 1e-3, 0
MINILM_LINEARS = {"include": ["encoder.*"], "types": ["Linear"]}


def adapted_linears(model: nn.Module, where: dict[str, Any]) -> list[str]:
    from bitsmith.select import as_selection

    return list(as_selection(where).resolve(model))


def lora_rank_for(model: nn.Module, names: list[str]) -> int:
    """The LoRA rank whose parameter count over ``names`` matches T-REX (r1 = r2 = 4) there."""
    trex = lora = 0
    for name in names:
        layer = model.get_submodule(name)
        d_in, d_out = layer.in_features, layer.out_features
        trex += R1 * d_in + R2 * d_out + R1 * R2 * d_in + 2
        lora += d_in + d_out
    return max(1, round(trex / lora))


def adapt(model: nn.Module, kind: str, where: dict[str, Any]) -> nn.Module:
    """``model`` with ``kind`` adapters (``trex``, ``lora``), base frozen; ``head`` adds nothing."""
    names = adapted_linears(model, where)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        rank = lora_rank_for(model, names)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=names))
    for p in model.parameters():
        p.requires_grad_(False)
    if kind.startswith("trex"):
        compress(model, [build_method({"name": "t-rex", "r1": R1, "r2": R2, "where": where})])
    return model


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def pooled(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def sentiment_row(kind: str) -> dict[str, Any]:
    from bitsmith.zoo.minilm import load_hf_encoder, tokenize
    from bitsmith.zoo.sentiment import sentiment_split

    torch.manual_seed(SEED)
    base, tokenizer = load_hf_encoder()
    train, test = sentiment_split("movie", 0.2, SEED)
    batches = [train[i : i + BATCH] for i in range(0, len(train), BATCH)]
    tests = [test[i : i + 128] for i in range(0, len(test), 128)]
    train_priors: list[Tensor | None] = [None] * len(batches)
    test_priors: list[Tensor | None] = [None] * len(tests)
    start = time.perf_counter()
    if kind == "trex":  # the semantic intuition: the frozen base model's embeddings against k-means centroids
        with torch.no_grad():
            train_emb = [pooled(base, tokenize(tokenizer, [t for t, _ in b])) for b in batches]
            _, prior = intuition_prior(torch.cat(train_emb), R1 * R2, SEED)
            train_priors = [prior(e) for e in train_emb]
            test_priors = [prior(pooled(base, tokenize(tokenizer, [t for t, _ in b]))) for b in tests]
    model = adapt(copy.deepcopy(base), kind, MINILM_LINEARS)
    adapter_params = trainable(model)
    head = nn.Linear(base.config.hidden_size, 2)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=LR)
    model.train()
    for batch, batch_prior in zip(batches, train_priors, strict=True):
        texts, labels = [t for t, _ in batch], torch.tensor([y for _, y in batch])
        with semantic_prior(batch_prior):
            logits = head(pooled(model, tokenize(tokenizer, texts)))
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch, batch_prior in zip(tests, test_priors, strict=True):
            texts, labels = [t for t, _ in batch], torch.tensor([y for _, y in batch])
            with semantic_prior(batch_prior):
                correct += int((head(pooled(model, tokenize(tokenizer, texts))).argmax(-1) == labels).sum())
    return {"accuracy": correct / len(test), "adapter_params": adapter_params, "head_params": 2 * base.config.hidden_size + 2,
            "train_seconds": round(seconds, 1), "steps": len(batches), "train_sentences": len(train),
            "test_sentences": len(test), "lora_rank": lora_rank_for(base, adapted_linears(base, MINILM_LINEARS))}  # fmt: skip


def lm_row(model: nn.Module, task: Any, kind: str, steps: int) -> dict[str, Any]:
    """Adapters on SmolLM2's block Linears trained ``steps`` windows of the calibration text (next-token loss,
    uniform T-REX prior), then the held-out perplexities."""
    from bitsmith.data import token_windows

    where = {"include": ["model.layers.*"], "types": ["Linear"]}
    torch.manual_seed(SEED)
    windows = token_windows(task.calibration)
    tuned = adapt(copy.deepcopy(model), kind, where)
    params = trainable(tuned)
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-4)
    start = time.perf_counter()
    tuned.train()
    for step in range(steps):
        ids = windows[step % len(windows)]
        loss = tuned(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    tuned.eval()
    scored = tuned.merge_and_unload() if kind == "lora" else tuned
    return {**task.evaluate(scored), "adapter_params": params, "train_seconds": round(seconds, 1), "steps": steps,
            "lora_rank": lora_rank_for(model, adapted_linears(model, where))}  # fmt: skip
