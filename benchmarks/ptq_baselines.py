"""PTQ baselines: FP32 vs W8A8 / W6A6 / W4A8 / W4A4 with min-max, percentile and MSE observers and
per-tensor or per-channel weight scales, on the zoo CNN and ViT (Fashion-MNIST test set, 10k images).

Regenerate: ``make bench`` (or ``python benchmarks/ptq_baselines.py``). Writes
``docs/results/ptq-baselines.md`` and ``docs/results/ptq-baselines.png``.
"""

from __future__ import annotations

import copy
import itertools
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bitsmith import compress  # noqa: E402
from bitsmith.data import batches, subset  # noqa: E402
from bitsmith.eval.cost import model_cost  # noqa: E402
from bitsmith.methods.ptq import PTQ  # noqa: E402
from bitsmith.train import accuracy  # noqa: E402
from bitsmith.zoo import pretrained  # noqa: E402
from bitsmith.zoo.data import load_fashion_mnist  # noqa: E402

SETTINGS = [(8, 8), (6, 6), (4, 8), (4, 4)]
OBSERVERS = ["minmax", "percentile", "mse"]
GRANULARITIES = ["tensor", "channel"]
OUT = Path(__file__).parent.parent / "docs" / "results"


def run(models: list[str]) -> list[dict]:
    torch.set_num_threads(2)
    test = load_fashion_mnist("test")
    train = load_fashion_mnist("train")
    calib_images, calib_labels = subset(*train, 512, seed=1)
    calib = [x for x, _ in batches(calib_images, calib_labels, 128)]
    rows = []
    for name in models:
        base = pretrained(name)
        fp32 = accuracy(base, *test)
        size = model_cost(base).totals["size_bytes"]
        rows.append(
            {
                "model": name,
                "setting": "FP32",
                "observer": "-",
                "weights": "-",
                "accuracy": fp32,
                "size": size,
                "seconds": 0.0,
            }
        )
        print(f"{name} FP32 {100 * fp32:.2f}%", flush=True)
        for (w, a), observer, granularity in itertools.product(SETTINGS, OBSERVERS, GRANULARITIES):
            model = copy.deepcopy(base)
            start = time.perf_counter()
            method = PTQ(w_bits=w, a_bits=a, w_observer=observer, a_observer=observer, w_granularity=granularity)
            compress(model, method, calib)
            seconds = time.perf_counter() - start
            acc = accuracy(model, *test)
            row = {"model": name, "setting": f"W{w}A{a}", "observer": observer, "weights": f"per-{granularity}",
                   "accuracy": acc, "size": model_cost(model).totals["size_bytes"], "seconds": seconds}  # fmt: skip
            rows.append(row)
            print(f"{name} W{w}A{a} {observer:10s} per-{granularity:7s} {100 * acc:.2f}% ({seconds:.1f}s)", flush=True)
    return rows


def write(rows: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    lines = [
        "# PTQ baselines",
        "",
        "Post-training quantization with `ptq` (weights symmetric, activations = layer inputs, asymmetric per-tensor,",
        "static), 512 calibration images, top-1 on the full Fashion-MNIST test set (10,000 images). The same observer",
        "sets the weight and the activation ranges. Regenerate with `make bench`.",
        "",
        "| model | setting | observer | weight scales | top-1 % | Δ vs FP32 | size (KB) | calib s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fp32 = {r["model"]: r["accuracy"] for r in rows if r["setting"] == "FP32"}
    for r in rows:
        delta = "" if r["setting"] == "FP32" else f"{100 * (r['accuracy'] - fp32[r['model']]):+.2f}"
        lines.append(f"| {r['model']} | {r['setting']} | {r['observer']} | {r['weights']} | {100 * r['accuracy']:.2f} | "
                     f"{delta} | {r['size'] / 1024:.1f} | {r['seconds']:.2f} |")  # fmt: skip
    lines += ["", "![PTQ baselines](ptq-baselines.png)", ""]
    (OUT / "ptq-baselines.md").write_text("\n".join(lines))

    models = list(fp32)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        for observer, granularity in itertools.product(OBSERVERS, GRANULARITIES):
            pts = [
                r
                for r in rows
                if r["model"] == name and r["observer"] == observer and r["weights"] == f"per-{granularity}"
            ]
            ax.plot([r["setting"] for r in pts], [100 * r["accuracy"] for r in pts], marker="o",
                    linestyle="-" if granularity == "channel" else "--", label=f"{observer}, per-{granularity}")  # fmt: skip
        ax.axhline(100 * fp32[name], color="black", linewidth=1, label="FP32")
        ax.set_title(f"zoo {name}: PTQ top-1 on Fashion-MNIST")
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "ptq-baselines.png", dpi=110)


if __name__ == "__main__":
    write(run(sys.argv[1:] or ["cnn", "vit"]))
