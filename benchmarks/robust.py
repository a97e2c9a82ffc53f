"""Robust training on Fashion-MNIST with the zoo CNN: plain fine-tuning vs PGD adversarial training (Madry) at each
single strength vs MAT (mixed, max over strengths), all fine-tuned from the shipped FP32 CNN for the same epochs on
the same images, then attacked with the Adversarial Robustness Toolbox's PGD-20 and FGSM over an eps sweep.
``--speed`` times one PGD-20 evaluation of the 10,000 test images (run it alone). Writes
docs/results/robustness.{json,md,png}; rows resume (a training killed mid-way resumes from its last epoch);
``--write-only`` rewrites the page.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
from typing import Any

import torch
from common import RESULTS, Rows, save_figure
from llm import Entry, bench_threads, fill

from bitsmith.data import subset
from bitsmith.method import build_method
from bitsmith.robust import AttackSpec, art_attack, pgd
from bitsmith.robust.evaluate import attacked_accuracy
from bitsmith.train import TrainConfig, accuracy, fit
from bitsmith.zoo import cache_dir, pretrained
from bitsmith.zoo.data import load_fashion_mnist

ROWS = RESULTS / "robustness.json"
TRAIN_EXAMPLES, EPOCHS, TRAIN_STEPS = 20_000, 3, 3  # fine-tune budget, the same for every row
EVAL_EXAMPLES, EVAL_STEPS = 2_000, 20
SWEEP = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2)
STRENGTHS = [0.05, 0.1, 0.2]
CONFIG = TrainConfig(epochs=EPOCHS, batch_size=128, optimizer="adamw", lr=1e-3, weight_decay=0.0)

TRAININGS: list[tuple[str, list[dict[str, Any]]]] = [
    ("plain fine-tune", []),
    *[(f"PGD-AT eps {eps}", [{"name": "adv-train", "eps": eps, "steps": TRAIN_STEPS}]) for eps in STRENGTHS],
    ("MAT mixed {0.05, 0.1, 0.2}", [{"name": "mat", "strengths": STRENGTHS, "steps": TRAIN_STEPS, "mode": "mixed"}]),
    ("MAT max {0.05, 0.1, 0.2}", [{"name": "mat", "strengths": STRENGTHS, "steps": TRAIN_STEPS, "mode": "max"}]),
]


@functools.cache
def data() -> tuple[torch.Tensor, ...]:
    train = subset(*load_fashion_mnist("train"), TRAIN_EXAMPLES, seed=0)
    test = subset(*load_fashion_mnist("test"), EVAL_EXAMPLES, seed=1)
    return (*train, *test)


def train(methods: list[dict[str, Any]]) -> tuple[torch.nn.Module, float]:
    """The shipped CNN fine-tuned with ``methods``; the training state is kept so a killed run resumes."""
    x, y, _, _ = data()
    torch.manual_seed(0)
    model = pretrained("cnn")
    digest = hashlib.sha256(json.dumps([methods, str(CONFIG), TRAIN_EXAMPLES], sort_keys=True).encode()).hexdigest()
    state = cache_dir() / "bench" / f"robust-{digest[:16]}.pt"
    state.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fit(model, x, y, CONFIG, [build_method(m) for m in methods], checkpoint=state)
    state.unlink()
    return model.eval(), time.perf_counter() - start


def sweep_row(methods: list[dict[str, Any]]) -> dict[str, Any]:
    model, seconds = train(methods)
    _, _, xt, yt = data()
    row: dict[str, Any] = {"clean": accuracy(model, xt, yt), "train_seconds": round(seconds, 1), "pgd": {}, "fgsm": {}}
    for eps in SWEEP:
        for name in ("pgd", "fgsm"):
            if eps == 0:
                row[name][str(eps)] = row["clean"]
                continue
            spec = AttackSpec(name=name, eps=eps, steps=EVAL_STEPS)
            row[name][str(eps)] = attacked_accuracy(model, xt, yt, art_attack(model, xt, yt, spec))
    for name in ("pgd", "fgsm"):
        values = list(row[name].values())
        row[f"{name}_mean"], row[f"{name}_worst"] = sum(values) / len(values), min(values)
    row["threads"] = torch.get_num_threads()
    return row


def speed_row() -> dict[str, Any]:
    """One PGD-20 (L-inf 0.1) evaluation of the shipped CNN on all 10,000 test images: ART's and bitsmith's."""
    model = pretrained("cnn")
    x, y = load_fashion_mnist("test")
    spec = AttackSpec(eps=0.1, steps=20)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "examples": len(y)}
    for name, attacker in (("art", art_attack), ("bitsmith", pgd)):
        start = time.perf_counter()
        out[f"{name}_accuracy"] = attacked_accuracy(model, x, y, attacker(model, x, y, spec))
        out[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
    return out


def entries() -> list[Entry]:
    return [(label, {"section": "training", "variant": label}, {"methods": methods},
             functools.partial(sweep_row, methods)) for label, methods in TRAININGS]  # fmt: skip


def write(rows: list[dict[str, Any]]) -> None:
    trained = [r for r in rows if r.get("section") == "training" and "error" not in r]
    head = " | ".join(f"PGD {eps}" for eps in SWEEP[1:])
    lines = [
        "# Robustness",
        "",
        "Regenerate: `make bench-robust` (`python benchmarks/robust.py`, then `--speed` alone; rows resume).",
        "",
        "## Adversarial training: plain vs PGD-AT vs MAT (zoo CNN, Fashion-MNIST)",
        "",
        f"Every row fine-tunes the shipped FP32 CNN for {EPOCHS} epochs on the same {TRAIN_EXAMPLES:,} training images "
        f"(AdamW lr 1e-3, batch 128; training attacks PGD-{TRAIN_STEPS}, step 2.5 eps / {TRAIN_STEPS}, random start). "
        f"Top-1 % on {EVAL_EXAMPLES:,} test images (a seeded subset) under the Adversarial Robustness Toolbox's "
        f"PGD-{EVAL_STEPS} (L-inf, step 2.5 eps / {EVAL_STEPS}, one random start) and FGSM; mean and worst over eps "
        f"in {{{', '.join(str(e) for e in SWEEP)}}} (0 = clean).",
        "",
        f"| training | clean | {head} | PGD mean | PGD worst | FGSM mean | train s | load |",
        "|---|---|" + "---|" * (len(SWEEP) - 1) + "---|---|---|---|---|",
    ]
    for r in trained:
        cells = " | ".join(f"{100 * r['pgd'][str(eps)]:.2f}" for eps in SWEEP[1:])
        lines.append(f"| {r['name']} | {100 * r['clean']:.2f} | {cells} | {100 * r['pgd_mean']:.2f} | "
                     f"{100 * r['pgd_worst']:.2f} | {100 * r['fgsm_mean']:.2f} | {r['train_seconds']:.0f} | "
                     f"{r['load'][0]:.1f} |")  # fmt: skip
    speed = [r for r in rows if r.get("section") == "speed" and "error" not in r]
    if speed:
        s = speed[-1]
        lines += ["", "## Evaluation time", "", f"PGD-20 (L-inf 0.1) of the shipped CNN on all {s['examples']:,} test "
                  f"images, {s['threads']} threads, load {s['load'][0]:.2f} when it started:", "",
                  "| attack implementation | robust top-1 % | seconds |", "|---|---|---|",
                  f"| Adversarial Robustness Toolbox | {100 * s['art_accuracy']:.2f} | {s['art_seconds']:.1f} |",
                  f"| bitsmith.robust.pgd | {100 * s['bitsmith_accuracy']:.2f} | {s['bitsmith_seconds']:.1f} |"]  # fmt: skip
    lines += ["", "![accuracy vs eps](robustness.png)", ""]
    (RESULTS / "robustness.md").write_text("\n".join(lines))
    plot(trained)


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.plot(SWEEP, [100 * r["pgd"][str(eps)] for eps in SWEEP], marker="o", label=r["name"])
    ax.set_xlabel("PGD-20 eps (L-inf, images in [0, 1])")
    ax.set_ylabel("top-1 %")
    ax.set_title("Zoo CNN on Fashion-MNIST: accuracy vs attack strength")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, "robustness.png")


if __name__ == "__main__":
    if "--write-only" in sys.argv:
        write(json.loads(ROWS.read_text()))
    else:
        torch.set_num_threads(bench_threads())
        speed = "--speed" in sys.argv
        todo = [("PGD-20 timing", {"section": "speed"}, {}, speed_row)] if speed else entries()
        fill(Rows(ROWS), todo, write)
