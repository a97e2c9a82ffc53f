"""FAR rows of the attention benchmark (issue 41): attention blocks of the zoo ViT and of all-MiniLM-L6-v2 replaced by
multi-head BiLSTMs (``far``), distilled block by block, the ViT then fine-tuned end to end (and pruned); accuracy or
cosine / recall, parameters, and (``--only latency``, alone on the machine) the forward latency of every cached model
against the original in one run."""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import load

from bitsmith import build_method, compress, save
from bitsmith import load as load_checkpoint
from bitsmith.eval.latency import time_forward
from bitsmith.train import TrainConfig, accuracy, fit
from bitsmith.zoo import cache_dir, pretrained
from bitsmith.zoo.data import load_fashion_mnist

VIT_TRAIN = TrainConfig(epochs=2, batch_size=128, optimizer="adamw", lr=5e-4, weight_decay=0.05, warmup_epochs=0.2,
                        label_smoothing=0.1)  # fmt: skip
VIT_CALIB = 1024  # training images the block-wise distillation sees (8 batches of 128)
VIT_CONFIGS: dict[str, dict[str, Any]] = {
    **{f"block {i}": {"blocks": [i]} for i in range(4)},
    "blocks 0-1 (half)": {"blocks": [0, 1]},
    "all 4 blocks": {"blocks": "all"},
    "all 4 blocks, pruned to 50 % of the LSTM parameters": {"blocks": "all", "keep": 0.5},
    "all 4 blocks, pruned to 25 %": {"blocks": "all", "keep": 0.25},
    "all 4 blocks, 4 epochs": {"blocks": "all", "epochs": 4},  # the budget curve of the all-blocks row
    "all 4 blocks, 8 epochs": {"blocks": "all", "epochs": 8},
}
MINILM_TEXTS = 1024  # distillation sentences from the Python library docs (the evaluation pairs are docstrings)
MINILM_STEPS = {"distill_steps": 200, "joint_steps": 50}
MINILM_CONFIGS: dict[str, dict[str, Any]] = {  # the target's row first: MiniLM rows take long on one core
    "all 6 blocks": {"blocks": "all", **MINILM_STEPS},
    "blocks 3-5 (half)": {"blocks": [3, 4, 5], **MINILM_STEPS},
    **{f"block {i}": {"blocks": [i], **MINILM_STEPS} for i in range(6)},
}
LATENCY_BATCH = {"vit": 64, "minilm": 32}


def cached(name: str, config: dict[str, Any], train: TrainConfig = VIT_TRAIN) -> Path:
    digest = hashlib.sha256(json.dumps([name, config, train.__dict__], sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "bench" / f"far-{name}-{digest}.safetensors"


def far_config(entry: dict[str, Any]) -> tuple[dict[str, Any], TrainConfig]:
    """A row's ``far`` recipe entry and its training (an ``epochs`` key overrides ``VIT_TRAIN``'s)."""
    fields = {k: v for k, v in entry.items() if k != "epochs"}
    epochs = entry.get("epochs", VIT_TRAIN.epochs)
    return {"name": "far", **fields}, TrainConfig(**{**VIT_TRAIN.__dict__, "epochs": epochs})


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def vit_row(label: str) -> dict[str, Any]:
    config, train = far_config(VIT_CONFIGS[label])
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    model = pretrained("vit")
    fp32 = {"accuracy": accuracy(model, xt, yt), "params": params(model)}
    began = time.perf_counter()
    far = build_method(config)
    compress(model, [far], [(x[i : i + 128], y[i : i + 128]) for i in range(0, VIT_CALIB, 128)], finalize=False)
    distilled = accuracy(model, xt, yt)
    distill_seconds = time.perf_counter() - began
    path = cached("vit", config, train)
    path.parent.mkdir(parents=True, exist_ok=True)
    fit(model, x, y, train, [far], checkpoint=path.with_suffix(".pt"))
    far.finalize(model)
    seconds = time.perf_counter() - began
    save(model, path)
    path.with_suffix(".pt").unlink(missing_ok=True)
    return {"fp32_accuracy": fp32["accuracy"], "fp32_params": fp32["params"], "distilled_accuracy": distilled,
            "accuracy": accuracy(model, xt, yt), "params": params(model), "distill_seconds": round(distill_seconds, 1),
            "train_seconds": round(seconds, 1), "epochs": train.epochs, "config": config}  # fmt: skip


def docs_batches(tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    from bitsmith.zoo.minilm import tokenize
    from bitsmith.zoo.prose import python_docs

    paragraphs = [" ".join(p.split()) for p in python_docs("library").split("\n\n")]
    texts = [p for p in paragraphs if len(p) >= 60][:MINILM_TEXTS]
    return [tokenize(tokenizer, texts[i : i + 32], max_length=64) for i in range(0, len(texts), 32)]


def minilm_row(label: str) -> dict[str, Any]:
    config, _ = far_config(MINILM_CONFIGS[label])
    model, task = load("minilm")
    fp32, fp32_params = task.evaluate(model), params(model)
    began = time.perf_counter()
    compress(model, [build_method(config)], docs_batches(task.tokenizer))
    seconds = time.perf_counter() - began
    path = cached("minilm", config)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, path)
    return {**task.evaluate(model), "fp32_retrieval": fp32.get("retrieval"), "params": params(model),
            "fp32_params": fp32_params, "distill_seconds": round(seconds, 1), "config": config,
            "texts": MINILM_TEXTS}  # fmt: skip


def cached_models(name: str) -> dict[str, Path]:
    """The saved FAR model of every row measured so far, by label."""
    configs = VIT_CONFIGS if name == "vit" else MINILM_CONFIGS
    paths = {label: cached(name, *far_config(entry)) for label, entry in configs.items()}
    return {label: path for label, path in paths.items() if path.is_file()}


def latency_row(extra_vit: dict[str, Path], rounds: int = 7) -> dict[str, Any]:
    """Every cached model (FAR's, and ``extra_vit``: other ViT rows' by label) and its original, timed in interleaved
    rounds (each model once per round, in a fresh random order; 5 forwards each, 2 threads; run alone): the median
    over rounds, so that drift during the run does not favour the models timed early."""
    out: dict[str, Any] = {}
    spread: dict[str, Any] = {}
    order = random.Random(0)
    for name in ("vit", "minilm"):
        original, task = load(name)
        example = task.example(LATENCY_BATCH[name])
        paths = {**cached_models(name), **(extra_vit if name == "vit" else {})}
        models = {
            "original": original,
            **{label: load_checkpoint(p, load(name)[0]).eval() for label, p in paths.items()},
        }
        times: dict[str, list[float]] = {label: [] for label in models}
        for _ in range(rounds):
            labels = list(models)
            order.shuffle(labels)
            for label in labels:
                times[label].append(time_forward(models[label], example, runs=5, warmup=1, num_threads=2).median_ms)
        out[name] = {label: statistics.median(t) for label, t in times.items()}
        spread[name] = {label: (max(t) - min(t)) / statistics.median(t) for label, t in times.items()}
    return {"latency_ms": out, "range_over_median": spread, "rounds": rounds, "threads": 2, "batch": LATENCY_BATCH}


def page(rows: list[dict[str, Any]]) -> list[str]:
    """The FAR section of attention.md."""
    far = [r for r in rows if r.get("section") == "far"]
    timing = next((r for r in rows if r.get("section") == "far-latency" and "error" not in r), None)
    latency = timing["latency_ms"] if timing else {}
    lines = ["## FAR: attention replaced by multi-head LSTMs", "",
             "`far` (docs/methods/far.md): the chosen attention blocks become bidirectional LSTMs per head (units per "
             "head = the head width), distilled block by block (300 steps per block, then 100 joint steps on the "
             f"block-output loss). Zoo ViT: distilled on {VIT_CALIB:,} training images, then fine-tuned end to end "
             f"{VIT_TRAIN.epochs} epochs on the 60,000 (AdamW, lr {VIT_TRAIN.lr}, cross-entropy plus the block-output "
             "loss; pruning after epoch 1); top-1 on the 10,000 test images. MiniLM: distilled on "
             f"{MINILM_TEXTS:,} paragraphs of the Python library docs (64 tokens at most; 200 steps per block, 50 "
             "joint), no fine-tuning (the embedding task has no labels); cosine to the FP32 embeddings and recall@1 "
             "on the docstring pairs. Parameters: the whole model. Latency: one forward of a batch "
             f"({LATENCY_BATCH['vit']} images / {LATENCY_BATCH['minilm']} sentences), torch eager, 2 threads, every "
             "model and its original in one run, alone on the machine (`--only latency`): 7 interleaved rounds (each "
             "model once per round in a random order, the median of 5 forwards), the median over rounds.", "",
             "| model | replaced | after distillation | after fine-tuning | FP32 | params (FP32) | latency ms "
             "(original) | train s | load |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in far:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | error: {r['error']} | | | | | | |")
            continue
        ms = latency.get(r["model"], {})
        timed = f"{ms[r['variant']]:.1f} ({ms['original']:.1f})" if r["variant"] in ms else "not timed"
        if r["model"] == "vit":
            quality = (f"top-1 {100 * r['distilled_accuracy']:.2f}", f"top-1 {100 * r['accuracy']:.2f}",
                       f"{100 * r['fp32_accuracy']:.2f}")  # fmt: skip
            seconds = r["train_seconds"]
        else:
            quality = (f"cosine {r['cosine']:.4f}, recall@1 {r['retrieval']:.4f}", "—",
                       f"recall@1 {r['fp32_retrieval']:.4f}")  # fmt: skip
            seconds = r["distill_seconds"]
        lines.append(f"| {r['model']} | {r['variant']} | {quality[0]} | {quality[1]} | {quality[2]} | "
                     f"{r['params']:,} ({r['fp32_params']:,}) | {timed} | {seconds} | {r['load'][0]:.2f} |")  # fmt: skip
    if timing:
        lines += ["", f"Latency run: load {timing['load'][0]:.2f} (1-minute average when it started)."]
    plot_points(rows)
    return [*lines, "", *correlation_lines(rows)]


def single_block_points(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float, float]]]:
    """Per model, ``(layer, sparsity, drop)`` of every single-block replacement: sparsity ``1 -`` the layer's
    normalised attention entropy (the sparsity rows), drop the FP32 top-1 minus the distilled top-1 (ViT, before
    fine-tuning: the fixed budget) or ``1 -`` cosine to FP32 (MiniLM)."""
    entropy = {r["model"]: [v["entropy"] for v in r["layers"].values()]
               for r in rows if r.get("section") == "sparsity" and "error" not in r}  # fmt: skip
    out: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        if (
            r.get("section") != "far"
            or "error" in r
            or not r["variant"].startswith("block ")
            or r["model"] not in entropy
        ):
            continue
        layer = int(r["variant"].split()[1])
        drop = r["fp32_accuracy"] - r["distilled_accuracy"] if r["model"] == "vit" else 1 - r["cosine"]
        out.setdefault(r["model"], []).append((layer, 1 - entropy[r["model"]][layer], drop))
    return {model: sorted(points) for model, points in out.items()}


def correlation_lines(rows: list[dict[str, Any]]) -> list[str]:
    from scipy.stats import spearmanr

    points = single_block_points(rows)
    if not points:
        return []
    lines = ["### Sparser layers, cheaper replacements? (issue 41, item 2)", "",
             "One block replaced at a time, the same distillation budget for every layer: the layer's attention "
             "sparsity (1 - normalised entropy, table above) against the drop it causes (ViT: FP32 top-1 minus "
             "top-1 after distillation, before fine-tuning; MiniLM: 1 - cosine to FP32). The paper's claim: "
             "sparser layers cost less, a negative Spearman coefficient between sparsity and drop.", "",
             "| model | layer | sparsity | drop |", "|---|---|---|---|"]  # fmt: skip
    for model, pts in points.items():
        lines += [f"| {model} | {layer} | {sparsity:.3f} | {drop:.4f} |" for layer, sparsity, drop in pts]
    lines.append("")
    for model, pts in points.items():
        if len(pts) >= 3:
            rho = spearmanr([p[1] for p in pts], [p[2] for p in pts]).statistic
            lines.append(f"- {model}: Spearman coefficient (sparsity, drop) **{rho:.2f}** over {len(pts)} layers.")
    return [*lines, "", "![drop against sparsity per layer](attention-far.png)", ""]


def plot_points(rows: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt
    from common import save_figure

    points = single_block_points(rows)
    if not points:
        return
    fig, axes = plt.subplots(1, len(points), figsize=(4.5 * len(points), 3.5), squeeze=False)
    for ax, (model, pts) in zip(axes[0], points.items(), strict=True):
        ax.scatter([p[1] for p in pts], [p[2] for p in pts])
        for layer, sparsity, drop in pts:
            ax.annotate(str(layer), (sparsity, drop), fontsize=8)
        ax.set_xlabel("attention sparsity (1 - normalised entropy)")
        ax.set_ylabel("top-1 drop after distillation" if model == "vit" else "1 - cosine to FP32")
        ax.set_title(f"{model}: one block replaced by FAR", fontsize=9)
        ax.grid(alpha=0.3)
    save_figure(fig, "attention-far.png")
