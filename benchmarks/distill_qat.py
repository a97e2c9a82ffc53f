"""Distillation-stabilised QAT (issue 41, item 5): QAT of the zoo ViT and CNN at W4A4 and W4A6 from their FP32
checkpoints (and the ViT at W4A4 with a 5x learning rate, a stress test), plain (cross-entropy) vs logit distillation vs
distill-qat (features, representation and logits), three seeds each, the same budget; top-1 on the 10,000 test
images, the per-step task loss (its spread over the second half of training), and the runs that diverged. Writes
docs/results/distill-qat.{json,md,png}; rows resume.

Usage: python benchmarks/distill_qat.py [--only TEXT] [--write-only]
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from common import RESULTS, save_figure
from llm import Entry, run_rows

from bitsmith import build_method, compress
from bitsmith.distill import OutputRecorder
from bitsmith.method import Method
from bitsmith.train import TrainConfig, accuracy, fit
from bitsmith.zoo import pretrained
from bitsmith.zoo.data import load_fashion_mnist

ROWS = RESULTS / "distill-qat.json"
TRAIN_IMAGES = 20_000
SEEDS = (0, 1, 2)
EDGES = {"where": {"overrides": {"@first": {"w_bits": 8, "a_bits": 8}, "@last": {"w_bits": 8, "a_bits": 8}}}}
CONFIGS: dict[str, list[dict[str, Any]]] = {
    "plain QAT": [],
    "logit distillation": [{"name": "distill-qat", "feature_weight": 0.0, "representation_weight": 0.0}],
    "distill-qat (features + representation + logits)": [{"name": "distill-qat"}],
}
TRAIN = {"epochs": 1, "batch_size": 128, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0}
SETTINGS: dict[str, dict[str, Any]] = {  # model, activation bits, learning rate
    "ViT W4A4": {"model": "vit", "a_bits": 4, "lr": 1e-3},
    "ViT W4A4, lr x5 (stress)": {"model": "vit", "a_bits": 4, "lr": 5e-3},
    "CNN W4A4": {"model": "cnn", "a_bits": 4, "lr": 1e-3},
    "ViT W4A6": {"model": "vit", "a_bits": 6, "lr": 1e-3},
    "CNN W4A6": {"model": "cnn", "a_bits": 6, "lr": 1e-3},
}


@dataclass
class StepLoss(Method):
    """Records each training step's cross-entropy from the model's own output (no extra forward; adds nothing)."""

    def prepare(self, model: torch.nn.Module) -> dict[str, dict[str, Any]]:
        self._logits = OutputRecorder(model, [""])
        self._losses: list[float] = []
        return {}

    def penalty(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        logits = self._logits.take().get("")
        if logits is not None:
            self._losses.append(float(torch.nn.functional.cross_entropy(logits.detach(), batch[1])))
        return torch.zeros(())


def row(setting: str, label: str, seed: int) -> dict[str, Any]:
    config = SETTINGS[setting]
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:TRAIN_IMAGES]
    x, y = x[order], y[order]
    model = pretrained(config["model"])
    trace = StepLoss()
    qat = {"name": "qat", "step": "lsq", "w_bits": 4, "a_bits": config["a_bits"], **EDGES}
    methods = [*(build_method(m) for m in CONFIGS[label]), build_method(qat), trace]
    began = time.perf_counter()
    compress(model, methods, [(x[i : i + 128], y[i : i + 128]) for i in range(0, 256, 128)], finalize=False)
    try:
        fit(model, x, y, TrainConfig(**{**TRAIN, "lr": config["lr"]}, seed=seed), methods)
    except FloatingPointError as exc:
        return {"diverged": True, "error_text": str(exc)[:200], "losses": trace._losses}
    for method in methods:
        method.finalize(model)
    top1 = accuracy(model, xt, yt)
    second_half = trace._losses[len(trace._losses) // 2 :]
    return {"accuracy": top1, "diverged": not top1 > 0.2, "losses": trace._losses,
            "loss_std_second_half": statistics.pstdev(second_half), "train_seconds": round(time.perf_counter() - began, 1)}  # fmt: skip


def entries() -> list[Entry]:
    return [(f"{setting}: {label}, seed {seed}", {"setting": setting, "variant": label, "seed": seed},
             {"train": {**TRAIN, "lr": SETTINGS[setting]["lr"]}, "images": TRAIN_IMAGES},
             functools.partial(row, setting, label, seed))
            for setting in SETTINGS for seed in SEEDS for label in CONFIGS]  # fmt: skip


def write(rows: list[dict[str, Any]]) -> None:
    done = [{"setting": "ViT W4A4", **r} for r in rows if "error" not in r]  # (the first rows had no setting)
    lines = ["# Distillation-stabilised QAT (QD-BEV's objective on a classifier)", "",
             "Regenerate: `make bench-attention` (`python benchmarks/distill_qat.py`; rows resume).", "",
             "The zoo ViT and CNN from their FP32 checkpoints, QAT with LSQ steps at 4-bit weights and 4- or 6-bit "
             f"activations (the first and last layer at 8 bits), {TRAIN['epochs']} epoch on {TRAIN_IMAGES:,} training "
             f"images (a different random subset and order per seed), AdamW, batch {TRAIN['batch_size']}, lr "
             f"{TRAIN['lr']} (the stress setting 5x that); the same budget for every row of a setting. `distill-qat` "
             "distils the FP32 model's intermediate features (ViT: the middle block's output; CNN: `layer2`), the "
             "representation the head reads (ViT: the final norm's output; CNN: the pooled features) and the logits "
             "(T = 4); logit distillation keeps only the last term. Top-1 on the 10,000 test images; loss spread: the "
             "standard deviation of the per-step cross-entropy over the second half of training; a run diverges when "
             "its loss becomes non-finite or its top-1 ends below 20 %.", "",
             "| setting | variant | mean top-1 (seeds) | per seed | mean loss spread | diverged runs |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for setting in SETTINGS:
        for label in CONFIGS:
            mine = sorted(
                (r for r in done if r["setting"] == setting and r["variant"] == label), key=lambda r: r["seed"]
            )
            if not mine:
                continue
            tops = [100 * r["accuracy"] for r in mine if "accuracy" in r]
            spreads = [r["loss_std_second_half"] for r in mine if "loss_std_second_half" in r]
            mean_top = f"{statistics.mean(tops):.2f} ({len(tops)})" if tops else "—"
            seeds = " / ".join(f"{t:.2f}" for t in tops)
            mean_spread = f"{statistics.mean(spreads):.4f}" if spreads else "—"
            lines.append(f"| {setting} | {label} | {mean_top} | {seeds} | {mean_spread} | "
                         f"{sum(r['diverged'] for r in mine)} of {len(mine)} |")  # fmt: skip
    seconds = [r["train_seconds"] for r in done if "train_seconds" in r]
    if seconds:
        lines += ["", f"Training time per run: {min(seconds)}-{max(seconds)} s on one shared core (1-minute load "
                  f"{min(r['load'][0] for r in done):.2f}-{max(r['load'][0] for r in done):.2f})."]  # fmt: skip
    lines += ["", "![per-step cross-entropy](distill-qat.png)", ""]
    (RESULTS / "distill-qat.md").write_text("\n".join(lines))
    plot(done)


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    if not settings:
        return
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.4), squeeze=False)
    colours = dict(zip(CONFIGS, ("tab:gray", "tab:blue", "tab:red"), strict=True))
    for ax, setting in zip(axes[0], settings, strict=True):
        for r in (r for r in rows if r["setting"] == setting):
            losses = torch.tensor(r["losses"])
            smooth = torch.nn.functional.avg_pool1d(losses[None, None], 9, 1, 4, count_include_pad=False)[0, 0]
            ax.plot(smooth, color=colours[r["variant"]], alpha=0.7, label=r["variant"] if r["seed"] == 0 else None)
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("cross-entropy (9-step mean)")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, "distill-qat.png")


if __name__ == "__main__":
    run_rows(__doc__, ROWS, lambda args: entries(), write)
