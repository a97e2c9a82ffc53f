"""Training-time quantization on the zoo CNN: top-1 vs average weight bits.

So far: uniform QAT (STE and LSQ) at 2 / 3 / 4 weight bits with 8-bit activations, stem and classifier
at 8 bits, fine-tuned from the FP32 checkpoint; BSQ at three alphas from an 8-bit start (stem and
classifier at 8 bits by STE QAT, 1 extra fine-tune epoch at the found precision). CSQ, MSQ and HERO join as they
land (issue 6).

Regenerate: ``make bench-bit-level`` (``python benchmarks/bit_level.py [--epochs N]``). Writes
``docs/results/bit-level.{md,png,json}``; the JSON keeps finished rows (delete it to re-measure).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, Rows, load  # noqa: E402

from bitsmith import compress  # noqa: E402
from bitsmith.eval.cost import model_cost  # noqa: E402
from bitsmith.eval.report import atomic_write_text  # noqa: E402
from bitsmith.methods.bsq import BSQ  # noqa: E402
from bitsmith.methods.qat import QAT  # noqa: E402
from bitsmith.train import TrainConfig, fit  # noqa: E402
from bitsmith.zoo import cache_dir  # noqa: E402

BITS = [4, 3, 2]
BSQ_ALPHAS = [0.5, 1.0, 2.0]
ENDS_AT_8 = {"overrides": {"@first": {"w_bits": 8}, "@last": {"w_bits": 8}}}


def run(epochs: int) -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    rows = Rows(RESULTS / "bit-level.json")
    base, task = load("cnn", calib_size=256)
    if not rows.done(run="FP32"):
        rows.add({"run": "FP32", **task.evaluate(base), "avg_bits": 32.0, "seconds": 0.0})
    config = TrainConfig(epochs=epochs, optimizer="adamw", lr=5e-4, weight_decay=0.0)
    for bits in BITS:
        for step in ("ste", "lsq"):
            label = f"QAT {step.upper()} W{bits}A8"
            if rows.done(run=label, epochs=epochs):
                continue
            model = copy.deepcopy(base)
            method = QAT(w_bits=bits, a_bits=8, step=step, where=ENDS_AT_8)
            start = time.perf_counter()
            compress(model, method, task.calibration, finalize=False)
            train(model, task, config, [method], label)
            method.finalize(model)  # folds the batch norms into the quantized convolutions
            seconds = time.perf_counter() - start
            avg_bits = model_cost(model).totals["avg_weight_bits"]
            rows.add({"run": label, "epochs": epochs, **task.evaluate(model), "avg_bits": avg_bits, "seconds": seconds})
            print(rows.rows[-1], flush=True)
    for alpha in BSQ_ALPHAS:
        label = f"BSQ alpha={alpha:g}"
        if rows.done(run=label, epochs=epochs):
            continue
        model = copy.deepcopy(base)
        method = BSQ(alpha=alpha, start_bits=8, a_bits=8, finetune_epochs=1, where={"exclude": ["@first", "@last"]})
        ends = QAT(w_bits=8, a_bits=8, step="ste", where={"include": ["@first", "@last"]})
        start = time.perf_counter()
        compress(model, [method, ends], task.calibration, finalize=False)
        config = TrainConfig(epochs=epochs + 1, optimizer="sgd", lr=0.01, weight_decay=0.0)
        train(model, task, config, [method, ends], label)
        method.finalize(model)
        ends.finalize(model)
        seconds = time.perf_counter() - start
        avg_bits = model_cost(model).totals["avg_weight_bits"]
        rows.add({"run": label, "epochs": epochs + 1, **task.evaluate(model), "avg_bits": avg_bits,
                  "seconds": seconds, "layer_bits": method.precision(model)})  # fmt: skip
        print(rows.rows[-1], flush=True)
    return rows.rows


def train(model: torch.nn.Module, task: Any, config: TrainConfig, methods: list[Any], label: str) -> None:
    """``fit`` with a per-run resume file in the cache (a killed benchmark continues the run)."""
    state = cache_dir() / "bench" / f"bit-level-{label.replace(' ', '_')}-e{config.epochs}.pt"
    fit(model, *task.train, config, methods, checkpoint=state)
    state.unlink()


def write(rows: list[dict[str, Any]]) -> None:
    lines = [
        "# Training-time quantization (zoo CNN, Fashion-MNIST)",
        "",
        "Fine-tuned from the FP32 checkpoint with AdamW (lr 5e-4, cosine), 8-bit activations, stem and",
        "classifier weights at 8 bits, batch norms folded into the quantized convolutions (QAT rows); top-1 on the 10,000 test images; seconds on 2 threads including",
        "training. Regenerate: `make bench-bit-level`.",
        "",
        "| run | epochs | avg weight bits | top-1 % | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {r.get('epochs', '-')} | {r['avg_bits']:.2f} | {100 * r['accuracy']:.2f} | "
                     f"{r['seconds']:.0f} |")  # fmt: skip
    lines += ["", "![accuracy vs bits](bit-level.png)", ""]
    atomic_write_text(RESULTS / "bit-level.md", "\n".join(lines))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    fp32 = next(r for r in rows if r["run"] == "FP32")
    ax.axhline(100 * fp32["accuracy"], color="black", linewidth=1, label="FP32")
    for family in ("QAT STE", "QAT LSQ", "BSQ"):
        pts = sorted((r for r in rows if r["run"].startswith(family)), key=lambda r: r["avg_bits"])
        ax.plot([r["avg_bits"] for r in pts], [100 * r["accuracy"] for r in pts], marker="o", label=family)
    ax.set_xlabel("average weight bits")
    ax.set_ylabel("top-1 %")
    ax.set_title("zoo CNN: accuracy vs average weight bits")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "bit-level.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--write-only", action="store_true", help="re-render from the saved rows")
    args = parser.parse_args()
    write(Rows(RESULTS / "bit-level.json").rows if args.write_only else run(args.epochs))
