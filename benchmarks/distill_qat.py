"""Distillation-stabilised QAT (issue 41, item 5): QAT of the zoo ViT at W4A4 from its FP32 checkpoint, plain
(cross-entropy) vs logit distillation vs distill-qat (features, representation and logits), three seeds each, the
same budget; top-1 on the 10,000 test images, the per-step task loss (its spread over the second half of training),
and the runs that diverged. Writes docs/results/distill-qat.{json,md,png}; rows resume.

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
QAT = {"name": "qat", "step": "lsq", "w_bits": 4, "a_bits": 4,
       "where": {"overrides": {"@first": {"w_bits": 8, "a_bits": 8}, "@last": {"w_bits": 8, "a_bits": 8}}}}  # fmt: skip
CONFIGS: dict[str, list[dict[str, Any]]] = {
    "plain QAT": [],
    "logit distillation": [{"name": "distill-qat", "feature_weight": 0.0, "representation_weight": 0.0}],
    "distill-qat (features + representation + logits)": [{"name": "distill-qat"}],
}
TRAIN = {"epochs": 1, "batch_size": 128, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0}


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


def row(label: str, seed: int) -> dict[str, Any]:
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:TRAIN_IMAGES]
    x, y = x[order], y[order]
    model = pretrained("vit")
    trace = StepLoss()
    methods = [*(build_method(m) for m in CONFIGS[label]), build_method(QAT), trace]
    began = time.perf_counter()
    compress(model, methods, [(x[i : i + 128], y[i : i + 128]) for i in range(0, 256, 128)], finalize=False)
    try:
        fit(model, x, y, TrainConfig(**TRAIN, seed=seed), methods)
    except FloatingPointError as exc:
        return {"diverged": True, "error_text": str(exc)[:200], "losses": trace._losses}
    for method in methods:
        method.finalize(model)
    top1 = accuracy(model, xt, yt)
    second_half = trace._losses[len(trace._losses) // 2 :]
    return {"accuracy": top1, "diverged": not top1 > 0.2, "losses": trace._losses,
            "loss_std_second_half": statistics.pstdev(second_half), "train_seconds": round(time.perf_counter() - began, 1)}  # fmt: skip


def entries() -> list[Entry]:
    return [(f"{label}, seed {seed}", {"variant": label, "seed": seed}, {"train": TRAIN, "images": TRAIN_IMAGES},
             functools.partial(row, label, seed)) for seed in SEEDS for label in CONFIGS]  # fmt: skip


def write(rows: list[dict[str, Any]]) -> None:
    done = [r for r in rows if "error" not in r]
    lines = ["# Distillation-stabilised QAT (QD-BEV's objective on a classifier)", "",
             "Regenerate: `make bench-attention` (`python benchmarks/distill_qat.py`; rows resume).", "",
             f"The zoo ViT from its FP32 checkpoint, QAT at W4A4 (LSQ steps; patch embedding and head at 8 bits), "
             f"{TRAIN['epochs']} epoch on {TRAIN_IMAGES:,} training images (a different random subset and order per "
             f"seed), AdamW lr {TRAIN['lr']}, batch {TRAIN['batch_size']}; the same budget for every row. "
             "`distill-qat` distils the middle block's output, the final norm's output and the logits (T = 4) from "
             "the FP32 model; logit distillation keeps only the last term. Top-1 on the 10,000 test images; loss "
             "spread: the standard deviation of the per-step cross-entropy over the second half of training; a run "
             "diverges when its loss becomes non-finite or its top-1 ends below 20 %.", "",
             "| variant | seed | top-1 | loss spread | diverged | train s | load |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in done:
        top1 = f"{100 * r['accuracy']:.2f}" if "accuracy" in r else "—"
        spread = f"{r['loss_std_second_half']:.4f}" if "loss_std_second_half" in r else "—"
        lines.append(f"| {r['variant']} | {r['seed']} | {top1} | {spread} | {'yes' if r['diverged'] else 'no'} | "
                     f"{r.get('train_seconds', '—')} | {r['load'][0]:.2f} |")  # fmt: skip
    lines += ["", "| variant | mean top-1 (seeds) | mean loss spread | diverged runs |", "|---|---|---|---|"]
    for label in CONFIGS:
        mine = [r for r in done if r["variant"] == label]
        tops = [100 * r["accuracy"] for r in mine if "accuracy" in r]
        spreads = [r["loss_std_second_half"] for r in mine if "loss_std_second_half" in r]
        if mine:
            mean_top = f"{statistics.mean(tops):.2f} ({len(tops)})" if tops else "—"
            mean_spread = f"{statistics.mean(spreads):.4f}" if spreads else "—"
            lines.append(
                f"| {label} | {mean_top} | {mean_spread} | {sum(r['diverged'] for r in mine)} of {len(mine)} |"
            )
    lines += ["", "![per-step cross-entropy](distill-qat.png)", ""]
    (RESULTS / "distill-qat.md").write_text("\n".join(lines))
    plot(done)


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colours = dict(zip(CONFIGS, ("tab:gray", "tab:blue", "tab:red"), strict=True))
    for r in rows:
        losses = torch.tensor(r["losses"])
        smooth = torch.nn.functional.avg_pool1d(losses[None, None], 9, 1, 4, count_include_pad=False)[0, 0]
        ax.plot(smooth, color=colours[r["variant"]], alpha=0.7, label=r["variant"] if r["seed"] == 0 else None)
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy (9-step mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, "distill-qat.png")


if __name__ == "__main__":
    run_rows(__doc__, ROWS, lambda args: entries(), write)
