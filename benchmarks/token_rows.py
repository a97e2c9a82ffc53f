"""Token-pruning rows of the attention benchmark (issue 41, item 3): the zoo ViT with a token pruner before its first
block (``token-prune``: the distilled scorer; EViT-style attention fusion and ToMe-style merging as baselines) at three
kept-token shares, each fine-tuned the same short budget; the unpruned model fine-tuned the same is the control.
Latency is timed with FAR's models in one run (``far_rows.latency_row``)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from bitsmith import build_method, compress, save
from bitsmith.train import TrainConfig, accuracy, fit
from bitsmith.zoo import cache_dir, pretrained
from bitsmith.zoo.data import load_fashion_mnist

TRAIN = TrainConfig(epochs=1, batch_size=128, optimizer="adamw", lr=5e-4, weight_decay=0.05, warmup_epochs=0.1,
                    label_smoothing=0.1)  # fmt: skip
TRAIN_IMAGES, CALIB = 20_000, 1024
MODES = {"scorer": "token-prune (scorer)", "attention": "EViT-style (attention)", "merge": "ToMe-style (merging)"}
CONFIGS: dict[str, dict[str, Any] | None] = {
    "unpruned (fine-tuned the same)": None,
    **{f"{title}, keep {keep}": {"name": "token-prune", "mode": mode, "keep": keep}
       for keep in (0.5, 0.25, 0.75) for mode, title in MODES.items()},
}  # fmt: skip


def cached(config: dict[str, Any] | None) -> Path:
    digest = hashlib.sha256(json.dumps([config, TRAIN.__dict__, TRAIN_IMAGES], sort_keys=True).encode()).hexdigest()
    return cache_dir() / "bench" / f"token-prune-{digest[:12]}.safetensors"


def row(label: str) -> dict[str, Any]:
    config = CONFIGS[label]
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:TRAIN_IMAGES]
    model = pretrained("vit")
    fp32 = accuracy(model, xt, yt)
    began = time.perf_counter()
    methods = [build_method(config)] if config else []
    compress(model, methods, [(x[i : i + 128], y[i : i + 128]) for i in range(0, CALIB, 128)], finalize=False)
    before = accuracy(model, xt, yt)
    fit(model, x[order], y[order], TRAIN, methods)
    for method in methods:
        method.finalize(model)
    seconds = time.perf_counter() - began
    path = cached(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, path)
    return {"fp32_accuracy": fp32, "before_finetune": before, "accuracy": accuracy(model, xt, yt),
            "train_seconds": round(seconds, 1), "config": config}  # fmt: skip


def cached_models() -> dict[str, Path]:
    """``token: LABEL`` -> the saved model of every row measured so far."""
    return {f"token: {label}": cached(config) for label, config in CONFIGS.items() if cached(config).is_file()}


def page(rows: list[dict[str, Any]]) -> list[str]:
    done = [r for r in rows if r.get("section") == "tokens"]
    if not done:
        return []
    timing = next((r for r in rows if r.get("section") == "far-latency" and "error" not in r), None)
    ms = timing["latency_ms"]["vit"] if timing else {}
    lines = ["## Fewer tokens: pruning before the first block", "",
             "The zoo ViT (49 patch tokens and a class token) with a token pruner before its first block, every "
             f"variant at the same kept-token count: `token-prune`'s scorer (distilled on {CALIB:,} training images "
             "from the class token's attention, then refined through the merge weights), the EViT-style baseline "
             "(the first block's class-token attention, inattentive tokens fused into one) and the ToMe-style "
             f"baseline (bipartite merging); each fine-tuned {TRAIN.epochs} epoch on {TRAIN_IMAGES:,} training "
             f"images (AdamW, lr {TRAIN.lr}), like the unpruned control. Top-1 on the 10,000 test images; latency as "
             "in the FAR table (same run).", "",
             "| variant | top-1 before fine-tuning | top-1 | FP32 | latency ms (original) | speed-up | train s | load |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in done:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error']} | | | | | | |")
            continue
        mine = ms.get(f"token: {r['variant']}")
        timed = f"{mine:.1f} ({ms['original']:.1f})" if mine else "not timed"
        speed = f"{ms['original'] / mine:.2f}x" if mine else "—"
        lines.append(f"| {r['variant']} | {100 * r['before_finetune']:.2f} | {100 * r['accuracy']:.2f} | "
                     f"{100 * r['fp32_accuracy']:.2f} | {timed} | {speed} | {r['train_seconds']} | {r['load'][0]:.2f} |")  # fmt: skip
    return [*lines, ""]
