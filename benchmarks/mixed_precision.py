"""Mixed precision vs uniform precision at equal weight size (PTQ, A8), zoo CNN and ViT on Fashion-MNIST.

1. Uniform W2/W3/W4/W8 per-channel min-max PTQ vs ``mixed`` allocations (Hessian trace, top Hessian
   eigenvalue, empirical Fisher trace, error proxy, measured loss increase) from {2, 3, 4, 6, 8} bits
   at the average weight bits of uniform W3 and W4.
2. Critical classes (Fisher-aware, CNN): critical = {T-shirt, Pullover, Coat, Shirt}; critical-class
   top-1 of plain Hessian / overall-Fisher allocations vs the critical-class objective, at equal size,
   with true-label calibration; then 4-bit QAT fine-tuning with and without the Fisher-trace term.

Regenerate: ``make bench-mixed`` (``python benchmarks/mixed_precision.py [cnn vit critical]``).
Writes ``docs/results/mixed-precision.{md,png,json}``.
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, Rows, load, save_figure  # noqa: E402

from bitsmith import compress  # noqa: E402
from bitsmith.eval.cost import model_cost  # noqa: E402
from bitsmith.files import atomic_write_text  # noqa: E402
from bitsmith.method import Method  # noqa: E402
from bitsmith.methods.ptq.mixed import MixedPrecision  # noqa: E402
from bitsmith.methods.ptq.ptq import PTQ  # noqa: E402
from bitsmith.methods.qat.fisher_reg import FisherTraceRegularizer, critical_gradient_norm  # noqa: E402
from bitsmith.methods.qat.qat import QAT  # noqa: E402
from bitsmith.train import TrainConfig, fit  # noqa: E402

UNIFORM = [8, 4, 3, 2]
BUDGETS = [4.0, 3.0]
SENSITIVITIES = ["hessian", "eigen", "fisher", "error", "loss"]
BOPS_KINDS = ["hessian", "fisher", "loss"]  # weights and activations under the BOPs of W4A4
CRITICAL = [0, 2, 4, 6]  # T-shirt/top, Pullover, Coat, Shirt: the most confused classes
QAT_TRAIN = 12_000  # fine-tuning images for the Fisher-trace QAT rows


def run(models: list[str]) -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    rows = Rows(RESULTS / "mixed-precision.json")
    for name in [m for m in models if m != "critical"]:
        base, task = load(name, calib_size=256)
        if not rows.done(model=name, run="FP32"):
            size = model_cost(base).totals["size_bytes"]
            rows.add({"model": name, "run": "FP32", **task.evaluate(base), "avg_bits": 32.0, "size": size,
                      "seconds": 0.0})  # fmt: skip
        runs: dict[str, Method] = {f"uniform W{b}": PTQ(w_bits=b, a_bits=8) for b in UNIFORM}
        for budget in BUDGETS:
            for kind in SENSITIVITIES:
                runs[f"mixed {kind} {budget:g} bits"] = MixedPrecision(sensitivity=kind, avg_bits=budget, a_bits=8)
        runs["uniform W4A4"] = PTQ(w_bits=4, a_bits=4)
        for kind in BOPS_KINDS:
            runs[f"mixed W+A {kind}, BOPs of W4A4"] = MixedPrecision(
                sensitivity=kind, avg_bits=None, bops=0.25, a_candidates=[4, 6, 8]
            )
        for label, method in runs.items():
            if rows.done(model=name, run=label):
                continue
            model = copy.deepcopy(base)
            start = time.perf_counter()
            compress(model, method, task.calibration)
            seconds = time.perf_counter() - start
            cost = model_cost(model, task.first(task.example(1))).totals
            extra = {"allocation": method.allocation} if isinstance(method, MixedPrecision) else {}
            if "A4" in label:
                extra["section"] = "bops"
            rows.add({"model": name, "run": label, **task.evaluate(model), "avg_bits": cost["avg_weight_bits"],
                      "size": cost["size_bytes"], "bops": cost["bops"], "seconds": seconds, **extra})  # fmt: skip
            print({k: v for k, v in rows.rows[-1].items() if k != "allocation"}, flush=True)
    if "critical" in models:
        for model in ("cnn", "vit"):
            critical_rows(rows, model)
    return rows.rows


def critical_rows(rows: Rows, name: str) -> None:
    """Critical-class top-1 at equal size: uniform, plain Hessian / Fisher, critical-class objectives;
    then (CNN) QAT W4A8 with and without the Fisher-trace regulariser."""
    base, task = load(name, calib_size=256)
    task.critical = CRITICAL
    calib = task.labelled_calibration
    key = {"model": name, "section": "critical"}
    runs: dict[str, Method] = {}
    for budget in BUDGETS:
        runs[f"uniform W{budget:g}"] = PTQ(w_bits=int(budget), a_bits=8)
        for kind in ("hessian", "fisher"):
            runs[f"{kind} {budget:g} bits"] = MixedPrecision(sensitivity=kind, avg_bits=budget, a_bits=8)
            runs[f"{kind} critical {budget:g} bits"] = MixedPrecision(
                sensitivity=kind, avg_bits=budget, a_bits=8, critical=CRITICAL
            )
        runs[f"fisher critical x10 {budget:g} bits"] = MixedPrecision(
            sensitivity="fisher", avg_bits=budget, a_bits=8, critical=CRITICAL, critical_weight=10.0
        )
    for label, method in runs.items():
        if rows.done(**key, run=label):
            continue
        model = copy.deepcopy(base)
        start = time.perf_counter()
        compress(model, method, calib)
        seconds = time.perf_counter() - start
        allocation = getattr(method, "allocation", None) or {}
        rows.add({**key, "run": label, **task.evaluate(model), "avg_bits": model_cost(model).totals["avg_weight_bits"],
                  "seconds": seconds, "w_bits": [choice["w_bits"] for choice in allocation.values()]})  # fmt: skip
        print(rows.rows[-1], flush=True)
    if name != "cnn":
        return
    images, labels = task.train
    pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))[:QAT_TRAIN]
    train = (images[pick], labels[pick])
    for lam in (0.0, 0.1, 1.0):
        label = f"QAT LSQ W4A8, Fisher-trace lam={lam:g}"
        if rows.done(**key, run=label):
            continue
        model = copy.deepcopy(base)
        methods: list[Method] = [
            QAT(w_bits=4, a_bits=8, step="lsq"),
            FisherTraceRegularizer(critical=CRITICAL, lam=lam),
        ]
        start = time.perf_counter()
        compress(model, methods, task.calibration, finalize=False)
        fit(model, *train, TrainConfig(epochs=2, optimizer="adamw", lr=5e-4, weight_decay=0.0), methods)
        for method in methods:
            method.finalize(model)
        seconds = time.perf_counter() - start
        train_task = copy.copy(task)
        train_task.test = train
        critical_train = train_task.evaluate(model)["critical_accuracy"]
        metrics = task.evaluate(model)
        rows.add({**key, "run": label, **metrics, "critical_train": critical_train,
                  "critical_gap": critical_train - metrics["critical_accuracy"],
                  "fisher_critical": critical_fisher(model, task), "avg_bits": 4.0, "seconds": seconds})  # fmt: skip
        print(rows.rows[-1], flush=True)


def critical_fisher(model: torch.nn.Module, task: Any, examples: int = 256, chunk: int = 32) -> float:
    """``tr(F_A)`` on test images: mean over chunks of ``||grad_W L_A||^2`` (all weight layers)."""
    images, labels = task.test
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    model.eval()
    values = [
        float(critical_gradient_norm(model, weights, (images[i : i + chunk], labels[i : i + chunk]), CRITICAL).detach())
        for i in range(0, examples, chunk)
    ]
    return sum(values) / len(values)


def write(rows: list[dict[str, Any]]) -> None:
    lines = [
        "# Mixed precision vs uniform precision (PTQ, 8-bit activations)",
        "",
        "Weights per-channel symmetric min-max; activations per-tensor 8-bit min-max; 256 calibration images",
        "(the sensitivities use the float model's predictions as labels); top-1 on the 10,000 test images.",
        "`mixed` solves a HiGHS integer program over {2, 3, 4, 6, 8} bits per layer at the weight budget of",
        "uniform W4 / W3. Seconds include the sensitivity and the solver, on 2 threads.",
        "Regenerate: `make bench-mixed`.",
        "",
        "| model | run | avg weight bits | size (KB) | top-1 % | seconds |",
        "|---|---|---|---|---|---|",
    ]
    main = [r for r in rows if "section" not in r]
    for r in main:
        lines.append(f"| {r['model']} | {r['run']} | {r['avg_bits']:.2f} | {r['size'] / 1024:.1f} | "
                     f"{100 * r['accuracy']:.2f} | {r['seconds']:.1f} |")  # fmt: skip
    lines += ["", "![mixed precision](mixed-precision.png)", ""]
    lines += bops_table([r for r in rows if r.get("section") == "bops"])
    lines += critical_table([r for r in rows if r.get("section") == "critical"])
    atomic_write_text(RESULTS / "mixed-precision.md", "\n".join(lines))
    rows = main
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model and r["run"] != "FP32"]
        for family in ["uniform", *SENSITIVITIES]:
            pts = sorted((r for r in mine if r["run"].split()[1 if family != "uniform" else 0] == family),
                         key=lambda r: r["size"])  # fmt: skip
            ax.plot([r["size"] / 1024 for r in pts], [100 * r["accuracy"] for r in pts], marker="o", label=family)
        fp32 = next(r for r in rows if r["model"] == model and r["run"] == "FP32")
        ax.axhline(100 * fp32["accuracy"], color="black", linewidth=1, label="FP32")
        ax.set_xlabel("model size (KB)")
        ax.set_ylabel("top-1 %")
        ax.set_title(f"{model}: accuracy vs size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, "mixed-precision.png")


def bops_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "## Weights and activations under a BOPs budget",
        "",
        "Each layer picks (weight bits, activation bits) from {2, 3, 4, 6, 8} x {4, 6, 8} with BOPs",
        "(MACs x w bits x a bits, per image) at most those of uniform W4A4; the activation sensitivity is",
        "measured in each layer's input on the calibration batch.",
        "",
        "| model | run | avg weight bits | MBOPs | top-1 % | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['run']} | {r['avg_bits']:.2f} | {r['bops'] / 1e6:.1f} | "
                     f"{100 * r['accuracy']:.2f} | {r['seconds']:.1f} |")  # fmt: skip
    return [*lines, ""]


def critical_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "## Critical classes",
        "",
        f"Critical classes {CRITICAL} (T-shirt, Pullover, Coat, Shirt). PTQ rows: 256 calibration images",
        "with their true labels; `critical` rows measure the curvature of `L_F + L_A` (`L_A`: cross-entropy",
        "with the other classes merged into one), `critical x10` that of `L_F + 10 L_A`. QAT rows: LSQ W4A8 fine-tuned 2 epochs on 12,000 training",
        "images with `lam * ||grad_W L_A||^2` added; *train - test* is the critical-class top-1 gap; `tr(F_A)`",
        "is `||grad_W L_A||^2` averaged over 8 test chunks of 32 images.",
        "",
        "Where a `critical` row equals its plain row, the integer program chose the same bits for every",
        "layer: adding `L_A` raised every layer's trace by a similar factor, and only the ratios between",
        "layers move the allocation (re-measured rows record it in the *w bits per layer* column).",
        "",
        "| model | run | avg weight bits | top-1 % | critical top-1 % | critical train - test | tr(F_A) | seconds "
        "| w bits per layer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = f"{100 * r['critical_gap']:.2f}" if "critical_gap" in r else "-"
        fisher = f"{r['fisher_critical']:.3f}" if "fisher_critical" in r else "-"
        bits = " ".join(str(b) for b in r["w_bits"]) if r.get("w_bits") else "-"
        lines.append(f"| {r['model']} | {r['run']} | {r['avg_bits']:.2f} | {100 * r['accuracy']:.2f} | "
                     f"{100 * r['critical_accuracy']:.2f} | {gap} | {fisher} | {r['seconds']:.0f} | {bits} |")  # fmt: skip
    return [*lines, ""]


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-only"]:
        write(Rows(RESULTS / "mixed-precision.json").rows)
    else:
        run(sys.argv[1:] or ["cnn", "vit", "critical"])
        write(Rows(RESULTS / "mixed-precision.json").rows)  # every model's rows, not only the ones just measured
