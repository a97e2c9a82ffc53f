"""Budget curves: for every target a closing note called missed, the gap between the method and its baseline at
1x, 2x and 4x our training budget, read from the benchmarks' stored rows, so a page says whether the gap closes
with compute or not.

Writes docs/results/budget-curves.{md,png}; nothing is measured here (each curve names the command that measures
its rows). A claim whose rows are not measured yet is listed as such.

Usage: python benchmarks/budget_curves.py
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from common import RESULTS, save_figure

PAGE, FIGURE = RESULTS / "budget-curves.md", "budget-curves.png"


@dataclass(frozen=True)
class Curve:
    """One missed claim: the method's and the baseline's rows (by name) at each budget."""

    claim: str
    results: str  # the results file under docs/results holding both rows
    budget: str  # what one budget unit is
    paper: str  # the paper's own budget, for scale
    metrics: tuple[tuple[str, str], ...]  # (row field, label)
    lower_is_better: bool  # perplexity, FID; otherwise an accuracy stored as a fraction
    points: tuple[tuple[int, str, str], ...]  # (budget in units, method row, baseline row)
    command: str
    baseline_field: str = ""  # the baseline's value is this field of the method's own row (e.g. its FP32 accuracy)


def clat_points(method: str, baseline: str, epochs: str) -> tuple[tuple[int, str, str], ...]:
    return tuple((n, f"{method}{epochs.format(n=n, s='s' * (n > 1))}", f"{baseline}{epochs.format(n=n, s='s' * (n > 1))}")
                 for n in (1, 2, 4))  # fmt: skip


def vit_points(method: str, baseline: str) -> tuple[tuple[int, str, str], ...]:
    return tuple((n, method + f", {n} epochs" * (n > 1), baseline + f", {n} epochs" * (n > 1)) for n in (1, 2, 4))


PPL = (("perplexity", "Persuasion"), ("perplexity_docs", "Python docs"))
PGD_MEAN = (("pgd_mean", "PGD-20 mean over eps"),)
PAT_ROW = "{} (hidden 576 -> 432, {} steps)"
LM_ROW = "language model: {}"

CURVES: tuple[Curve, ...] = (
    Curve("PAT beats activation-norm pruning + LoRA (SmolLM2, equal parameters and steps)", "moe.json",
          "fine-tune steps (one 512-token window each)", "about 10,000 steps", PPL, True,
          tuple((n, PAT_ROW.format("PAT", n), PAT_ROW.format("activation-norm pruning + LoRA", n)) for n in (100, 200, 400)),
          'python benchmarks/moe.py --only "steps)"'),
    Curve("T-REX at least LoRA's perplexity on language modelling (SmolLM2, equal adapter parameters)", "moe.json",
          "adapter fine-tune steps (one 512-token window each)", "full fine-tuning runs of many epochs", PPL, True,
          tuple((n, LM_ROW.format("T-REX r1 = r2 = 4 (uniform prior)") + f", {n} steps" * (n > 60),
                 LM_ROW.format("LoRA (peft), equal parameters") + f", {n} steps" * (n > 60)) for n in (60, 120, 240)),
          'python benchmarks/moe.py --only "language model"'),
    Curve("CLAT at least full PGD-AT fine-tuning's robust accuracy (zoo CNN, Fashion-MNIST)", "robustness.json",
          "fine-tune epochs from the PGD-AT eps 0.1 CNN (20,000 images)", "fine-tuning a model adversarially trained "
          "for many epochs", PGD_MEAN, False, clat_points("CLAT (5 % of parameters)", "full PGD-AT", ", {n} more epoch{s}"),
          "python benchmarks/robust.py"),
    Curve("SAFER at least full PGD-AT fine-tuning's robust accuracy (zoo ViT, Fashion-MNIST)", "robustness.json",
          "fine-tune epochs from the shipped ViT (5,000 images)", "tens of epochs on CIFAR / ImageNet", PGD_MEAN, False,
          vit_points("ViT: SAFER (3 sharpest layers, rho 0.05)", "ViT: full PGD-AT eps 0.1"),
          "python benchmarks/robust.py"),
    Curve("NPFT, then RTN W4, at least LoRA, then RTN W4 on Persuasion (SmolLM2, equal steps)", "llm-methods.json",
          "fine-tune steps (one 512-token window each)", "fine-tuning on C4 for thousands of steps", PPL, True,
          tuple((n, f"NPFT, then RTN W4 g64 ({n} steps)", f"LoRA, then RTN W4 g64 ({n} steps)") for n in (120, 240, 480)),
          'python benchmarks/llm_methods.py --only "W4 g64 ("'),
    Curve("SharpBalance: higher corrupted accuracy than the SAM ensemble (3 CNNs, Fashion-MNIST; the stronger of its two "
          "baselines at 5 epochs)", "ensembles.json", "training epochs from scratch (20,000 images)", "200 epochs on CIFAR",
          (("corrupted.noise", "Gaussian noise"), ("corrupted.blur", "blur")), False,
          ((5, "SharpBalance (rho 0.05, flat ratio 0.5; SAM epochs 1-2, balanced 3-5)", "SAM ensemble (rho 0.05)"),
           *((n, f"SharpBalance at {n} epochs (rho 0.05)", f"SAM ensemble at {n} epochs (rho 0.05)") for n in (10, 20))),
          'python benchmarks/robust_ensembles.py'),
    Curve("Q-Diffusion W4A8: FID near FP32's (the zoo DDPM, 50 DDIM steps)", "diffusion.json",
          "block-reconstruction iterations per unit", "20,000 iterations per block (and 5,000 for the activation steps)",
          (("fid_zoo_cnn", "FID (zoo-CNN features)"),), True,
          ((1000, "W4A8 Q-Diffusion (uniform + split + block reconstruction)", "FP32"),
           *((n, f"W4A8 Q-Diffusion, {n} iterations per unit (budget curve)", "FP32") for n in (2000, 4000))),
          'python benchmarks/diffusion.py'),
    Curve("LiftQuant at m = 8 (16to8) at least m = 4 (8to4) at 2.0 b/w (SmolLM2)", "llm-methods.json",
          "codebook training steps x restarts (the m = 4 baseline's codebook unchanged)", "3000 steps x 5 restarts",
          PPL, True, tuple((steps * restarts, f"LiftQuant 2.0 b/w (16to8, codebook {steps} steps x {restarts}, Hadamard 64, "
                            "error feedback)", "LiftQuant 2.0 b/w (m=4, Hadamard 64, error feedback)")
                           for steps, restarts in ((1000, 1), (3000, 5))),
          'python benchmarks/llm_methods.py --only "16to8"'),
    Curve("FAR: every attention block of the zoo ViT replaced, top-1 within 1 point of the original (Fashion-MNIST)",
          "attention.json", "fine-tune epochs on the 60,000 training images", "300 epochs of DeiT training on ImageNet",
          (("accuracy", "top-1"),), False,
          tuple((n, "far vit: all 4 blocks" + f", {n} epochs" * (n > 2), "the original") for n in (2, 4, 8)),
          'python benchmarks/attention.py --only "far vit: all 4 blocks"', baseline_field="fp32_accuracy"),
)  # fmt: skip

PENDING: tuple[tuple[str, str], ...] = (  # claims called missed whose budget curve is not measured yet
    ("MoBiQuant at 4 bits (2 of 4 slices): near a 4-bit GPTQ model (llm-methods.md)", "slice training steps"),
    ("Token routing: lower perplexity than a static mix at equal routed bits (llm-methods.md)", "router training steps"),
)  # fmt: skip


def rows_by_name(results: str) -> dict[str, dict[str, Any]]:
    path = RESULTS / results
    rows = json.loads(path.read_text()) if path.is_file() else []
    return {r["name"]: r for r in rows if "error" not in r and "name" in r}


def field(row: dict[str, Any], path: str) -> float:
    """A row's value at a dotted path (``corrupted.noise``)."""
    for part in path.split("."):
        row = row[part]
    return float(row)  # type: ignore[arg-type]


def gap(method: float, baseline: float, lower_is_better: bool) -> float:
    """How far the method is ahead of its baseline (negative: behind): a lower-is-better metric (perplexity, FID) as
    % of the baseline's value, accuracy in points."""
    return 100 * (baseline - method) / baseline if lower_is_better else 100 * (method - baseline)


def measured(curve: Curve) -> list[dict[str, Any]]:
    """One point per budget whose two rows both exist: the values and the gap of every metric."""
    rows = rows_by_name(curve.results)
    out = []
    for budget, method, baseline in curve.points:
        if method in rows and (baseline in rows or curve.baseline_field):
            base = rows[method] if curve.baseline_field else rows[baseline]
            values = {f: (field(rows[method], f), field(base, curve.baseline_field or f)) for f, _ in curve.metrics}
            gaps = {f: gap(m, b, curve.lower_is_better) for f, (m, b) in values.items()}
            out.append({"budget": budget, "values": values, "gaps": gaps})
    return out


def trend(points: list[dict[str, Any]], field: str) -> str:
    """The gap at the smallest and the largest budget measured, in words a reader checks against the table."""
    if len(points) < 2:
        return "one budget measured"
    first, last = points[0]["gaps"][field], points[-1]["gaps"][field]
    if first < 0 <= last:
        word = "closes (the method ahead at the largest budget)"
    elif first >= 0 > last:
        word = "reverses (the baseline ahead at the largest budget)"
    elif abs(last) < abs(first):
        word = "narrows" if last < 0 else "the method's lead shrinks"
    else:
        word = "widens" if last < 0 else "the method's lead grows"
    return f"{first:+.2f} -> {last:+.2f}: {word}"


def cell(value: float, lower_is_better: bool) -> str:
    return f"{value:.2f}" if lower_is_better else f"{100 * value:.2f}"


def write() -> None:
    unit = {True: "gap = (baseline - method) / baseline, % of the baseline's value",
            False: "gap = method - baseline, points of top-1 %"}  # fmt: skip
    lines = ["# Budget curves", "",
             "Regenerate: `python benchmarks/budget_curves.py` (reads the stored rows; each curve names the command "
             "that measures them). For every target a closing note called missed: the method and its baseline at "
             "1x, 2x and 4x our budget, and the gap between them. A positive gap means the method is ahead; "
             f"perplexity and FID (lower is better): {unit[True]}; accuracy: {unit[False]}. One seed per row: the seed-to-seed spread is not "
             "measured, so a change of the gap smaller than a point or two is not a trend.", ""]  # fmt: skip
    plotted = []
    for curve in CURVES:
        points = measured(curve)
        lines += [f"## {curve.claim}", "", f"Budget unit: {curve.budget}; the paper: {curve.paper}. Rows: "
                  f"[{curve.results.replace('.json', '.md')}]({curve.results.replace('.json', '.md')}), measured by "
                  f"`{curve.command}`.", ""]  # fmt: skip
        if not points:
            lines += ["Not measured yet.", ""]
            continue
        plotted.append((curve, points))
        heads = " | ".join(f"{label}: method | baseline | gap" for _, label in curve.metrics)
        lines += [f"| budget | {heads} |", "|---|" + "---|---|---|" * len(curve.metrics)]
        for p in points:
            cells = " | ".join(f"{cell(p['values'][f][0], curve.lower_is_better)} | "
                               f"{cell(p['values'][f][1], curve.lower_is_better)} | {p['gaps'][f]:+.2f}"
                               for f, _ in curve.metrics)  # fmt: skip
            lines.append(f"| {p['budget']} | {cells} |")
        missing = [str(b) for b, _, _ in curve.points if b not in {p["budget"] for p in points}]
        lines += [""] + [f"- {label}: gap {trend(points, f)}" for f, label in curve.metrics]
        lines += [f"- Not measured yet at budget {', '.join(missing)}."] if missing else []
        lines.append("")
    lines += ["## Missed claims without a budget curve yet", "", "| claim | budget axis |", "|---|---|"]
    lines += [f"| {claim} | {axis} |" for claim, axis in PENDING]
    lines += ["", f"![gap to the baseline against budget]({FIGURE})", ""]
    PAGE.write_text("\n".join(lines))
    plot(plotted)


def plot(curves: list[tuple[Curve, list[dict[str, Any]]]]) -> None:
    import matplotlib.pyplot as plt

    if not curves:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.6), squeeze=False)
    for ax, (curve, points) in zip(axes[0], curves, strict=True):
        budgets = [p["budget"] for p in points]
        for field, label in curve.metrics:
            ax.plot(budgets, [p["gaps"][field] for p in points], marker="o", label=label)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel(curve.budget.split(" (")[0], fontsize=8)
        ax.set_ylabel("% of the baseline's value" if curve.lower_is_better else "points of top-1", fontsize=8)
        ax.set_title(curve.claim.split(" (")[0], fontsize=8, wrap=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Gap to the baseline against budget (above 0: the method ahead)", fontsize=9)
    save_figure(fig, FIGURE)


if __name__ == "__main__":
    write()
