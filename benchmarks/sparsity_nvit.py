"""The NViT part of the sparsity benchmark: structured ViT pruning (Taylor / magnitude / uniform width)
at several MACs targets, measured CPU latency, and the saliency's rank correlation with the loss.

Each run prunes the FP32 zoo ViT while training (AdamW lr 1e-3, cosine, 3 epochs of 60,000 images:
the Taylor and magnitude loops remove 32 units every 25 steps until the target, then fine-tune;
uniform width is cut before the first step). Latency: batch 256, 2 threads, median of 10 runs
after warm-up, FP32 timed in the same process (``--part nvit-latency`` re-times the saved
architectures alone; weights do not change the time). Criterion check: for every unit of the FP32
ViT, the loss increase on 1,000 held-out training images when it is removed, against its score
from 512 calibration images (Spearman rank correlation).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import matplotlib.pyplot as plt
import torch
from common import Rows, load, save_figure
from scipy.stats import spearmanr

from bitsmith import compress
from bitsmith.eval.latency import measure_latency
from bitsmith.methods.sparse.nvit import NViT
from bitsmith.structure import dims, macs, remove_units, shrink_to, structure_counts
from bitsmith.train import TrainConfig, fit
from bitsmith.zoo.vision import ViT

RUNS = [(0.5, "taylor"), (0.5, "taylor + MACs (eta 1)"), (0.5, "magnitude"), (0.5, "uniform"), (0.35, "taylor"),
        (0.35, "uniform"), (0.25, "uniform")]  # fmt: skip
CRITERIA: dict[str, dict[str, Any]] = {
    "taylor": {"criterion": "taylor"},
    "taylor + MACs (eta 1)": {"criterion": "taylor", "eta": 1.0},
    "magnitude": {"criterion": "magnitude"},
    "uniform": {"criterion": "uniform"},
}
EPOCHS = 3
LATENCY_BATCH = 256


def run_nvit(rows: Rows) -> None:
    base, task = load("vit", calib_size=512)
    for target, criterion in RUNS:
        if rows.done(family="NViT", criterion=criterion, param=target):
            continue
        model = copy.deepcopy(base)
        method = NViT(macs_target=target, per_step=32, interval=25, **CRITERIA[criterion])
        start = time.perf_counter()
        compress(model, method, task.calibration, finalize=False)
        fit(model, *task.train, TrainConfig(epochs=EPOCHS, optimizer="adamw", lr=1e-3, weight_decay=0.0), [method])
        method.finalize(model)
        row = {"model": "vit", "family": "NViT", "criterion": criterion, "param": target,
               **task.evaluate(model), "seconds": time.perf_counter() - start,
               "macs": macs(model) / macs(base), "params": sum(p.numel() for p in model.parameters()),
               "counts": structure_counts(model)}  # fmt: skip
        rows.add(row)
        print({k: v for k, v in row.items() if k != "counts"}, flush=True)
    if not rows.done(family="NViT criterion"):
        rows.add({"model": "vit", "family": "NViT criterion", "param": 0.0, **criterion_check(base, task)})
    time_latency(rows)


def time_latency(rows: Rows) -> None:
    """Latency of FP32 and of every pruned architecture, interleaved in this process."""
    example = load("vit")[1].example(LATENCY_BATCH)
    times = {"fp32": measure_latency(ViT(), example, runs=10, num_threads=2)}
    for r in (r for r in rows.rows if r["family"] == "NViT"):
        model = shrink_to(ViT(), r["counts"])
        times[f"{r['criterion']} {r['param']}"] = measure_latency(model, example, runs=10, num_threads=2)
    rows.put({"model": "vit", "family": "NViT latency", "param": 0.0, "ms": times}, family="NViT latency")


@torch.no_grad()
def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(model(x), y))


def criterion_check(base: torch.nn.Module, task: Any) -> dict[str, float]:
    """Spearman rho between each unit's score (Taylor, magnitude) and the loss increase of removing it."""
    x, y = task.train[0][-1000:], task.train[1][-1000:]
    reference = _loss(base, x, y)
    scores = {}
    for criterion in ("taylor", "magnitude"):
        method = NViT(criterion=criterion)
        model = copy.deepcopy(base)
        compress(model, method, task.calibration, finalize=False)
        if method._ema is None:
            method._update_scores(model)
        scores[criterion] = method._ema
    increase, by_criterion = [], {c: [] for c in scores}
    for key, n in dims(base).items():
        for index in range(n):
            model = copy.deepcopy(base)
            keep = torch.ones(n, dtype=torch.bool)
            keep[index] = False
            remove_units(model, {key: keep})
            increase.append(_loss(model, x, y) - reference)
            for criterion, table in scores.items():
                by_criterion[criterion].append(float(table[key][index]))
    return {f"rho_{c}": float(spearmanr(v, increase).statistic) for c, v in by_criterion.items()} | {
        "units": len(increase)
    }


def nvit_lines(rows: list[dict[str, Any]]) -> list[str]:
    pruned = sorted((r for r in rows if r["family"] == "NViT"), key=lambda r: (-r["param"], r["criterion"]))
    if not pruned:
        return []
    fp32 = next(r for r in rows if r["model"] == "vit" and r["family"] == "FP32")["accuracy"]
    lines = ["", "## NViT: structured ViT pruning vs uniform width", "", *__doc__.split("\n\n")[1].splitlines(), "",
             "| MACs target | criterion | MACs | params | top-1 % | Δ vs FP32 | latency ms | speedup | blocks (heads/qk/v/mlp), emb |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    ms = next((r["ms"] for r in rows if r["family"] == "NViT latency"), {})
    fp32_params = next((r["params"] for r in rows if r["model"] == "vit" and r["family"] == "FP32" and "params" in r),
                       None)  # fmt: skip
    fp32_latency = f"{ms['fp32']:.1f} | 1.00x" if "fp32" in ms else "- | -"
    lines.append(f"| - | FP32 | 100.0% | {f'{fp32_params:,}' if fp32_params else '-'} | {100 * fp32:.2f} | - | "
                 f"{fp32_latency} | 4/16/16/128 each, 64 |")  # fmt: skip
    for r in pruned:
        if f"{r['criterion']} {r['param']}" in ms:
            r["latency_ms"], r["fp32_ms"] = ms[f"{r['criterion']} {r['param']}"], ms["fp32"]
        c = r["counts"]
        blocks = "; ".join(f"{c[f'heads.{i}']}/{c[f'qk.{i}']}/{c[f'v.{i}']}/{c[f'mlp.{i}']}" for i in range(4))
        latency = f"{r['latency_ms']:.1f} | {r['fp32_ms'] / r['latency_ms']:.2f}x" if "latency_ms" in r else "- | -"
        lines.append(f"| {r['param']:g} | {r['criterion']} | {100 * r['macs']:.1f}% | {r['params']:,} | "
                     f"{100 * r['accuracy']:.2f} | {100 * (r['accuracy'] - fp32):+.2f} | {latency} | {blocks}, {c['emb']} |")  # fmt: skip
    check = next((r for r in rows if r["family"] == "NViT criterion"), None)
    if check:
        lines += ["", f"Criterion check over all {check['units']} units of the FP32 ViT: Spearman ρ(score, loss "
                  f"increase) = {check['rho_taylor']:.3f} (Taylor), {check['rho_magnitude']:.3f} (magnitude)."]  # fmt: skip
    lines += ["", "![accuracy vs latency](sparsity-nvit.png)"]
    plot_latency(pruned, fp32)
    return lines


def plot_latency(pruned: list[dict[str, Any]], fp32: float) -> None:
    if not all("latency_ms" in r for r in pruned):
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([pruned[0]["fp32_ms"]], [100 * fp32], color="black", label="FP32", zorder=3)
    for criterion in CRITERIA:
        pts = sorted((r for r in pruned if r["criterion"] == criterion), key=lambda r: r["latency_ms"])
        ax.plot([r["latency_ms"] for r in pts], [100 * r["accuracy"] for r in pts], marker="o", label=criterion)
    ax.set_xlabel(f"latency ms (batch {LATENCY_BATCH}, 2 threads)")
    ax.set_ylabel("top-1 %")
    ax.set_title("zoo ViT: structured pruning, accuracy vs CPU latency")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, "sparsity-nvit.png")
