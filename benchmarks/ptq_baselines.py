"""PTQ baselines: FP32 vs W8A8 / W6A6 / W4A8 / W4A4 with min-max, percentile and MSE observers and
per-tensor or per-channel weight scales, on the zoo CNN and ViT (Fashion-MNIST test set, 10k images)
and the pretrained all-MiniLM-L6-v2 (cosine to FP32 and retrieval recall@1 on 406 docstring pairs).

Regenerate: ``make bench`` (or ``python benchmarks/ptq_baselines.py [cnn vit minilm]``). Writes
``docs/results/ptq-baselines.md`` and ``docs/results/ptq-baselines.png``; finished rows are kept in
``docs/results/ptq-baselines.json`` (an interrupted run resumes; delete it to re-measure everything).
"""

from __future__ import annotations

import copy
import itertools
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
from bitsmith.methods.ptq.ptq import PTQ  # noqa: E402

SETTINGS = [(8, 8), (6, 6), (4, 8), (4, 4)]
OBSERVERS = ["minmax", "percentile", "mse"]
GRANULARITIES = ["tensor", "channel"]
WHERE = {"minilm": {"exclude": ["pooler*"]}}  # the pooler is not part of the mean-pooled embedding


def run(models: list[str]) -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    rows = Rows(RESULTS / "ptq-baselines.json")
    for name in models:
        base, task = load(name)
        if not rows.done(model=name, setting="FP32"):
            fp32 = {**task.evaluate(base), "size": model_cost(base).totals["size_bytes"], "seconds": 0.0}
            rows.add({"model": name, "setting": "FP32", "observer": "-", "weights": "-", **fp32})
        else:
            task.evaluate(base)  # the FP32 embeddings are the cosine reference
        for (w, a), observer, granularity in itertools.product(SETTINGS, OBSERVERS, GRANULARITIES):
            key = {"model": name, "setting": f"W{w}A{a}", "observer": observer, "weights": f"per-{granularity}"}
            if rows.done(**key):
                continue
            model = copy.deepcopy(base)
            start = time.perf_counter()
            method = PTQ(w_bits=w, a_bits=a, w_observer=observer, a_observer=observer, w_granularity=granularity,
                         where=WHERE.get(name, {}))  # fmt: skip
            compress(model, method, task.calibration)
            seconds = time.perf_counter() - start
            rows.add(
                {**key, **task.evaluate(model), "size": model_cost(model).totals["size_bytes"], "seconds": seconds}
            )
            print(rows.rows[-1], flush=True)
    return [r for r in rows.rows if r["model"] in models]


def table(rows: list[dict[str, Any]], metrics: list[tuple[str, str]]) -> list[str]:
    titles = " | ".join(f"{title} | Δ" for _, title in metrics)
    lines = [f"| model | setting | observer | weight scales | {titles} | size (KB) | calib s |",
             "|---" * (6 + 2 * len(metrics)) + "|"]  # fmt: skip
    fp32 = {r["model"]: r for r in rows if r["setting"] == "FP32"}
    for r in rows:
        cells = []
        for key, _ in metrics:
            scale = 100 if key != "cosine" else 1
            digits = 2 if key != "cosine" else 4
            delta = "" if r["setting"] == "FP32" else f"{scale * (r[key] - fp32[r['model']][key]):+.{digits}f}"
            cells.append(f"{scale * r[key]:.{digits}f} | {delta}")
        lines.append(f"| {r['model']} | {r['setting']} | {r['observer']} | {r['weights']} | {' | '.join(cells)} | "
                     f"{r['size'] / 1024:.1f} | {r['seconds']:.2f} |")  # fmt: skip
    return lines


def write(rows: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    vision = [r for r in rows if "accuracy" in r]
    text = [r for r in rows if "retrieval" in r]
    lines = [
        "# PTQ baselines",
        "",
        "Post-training quantization with `ptq`: weights symmetric, activations (each layer's input) asymmetric",
        "per-tensor and static; the same observer sets the weight and the activation ranges. Regenerate with",
        "`make bench` (`python benchmarks/ptq_baselines.py cnn vit minilm`). Calibration seconds on 2 threads;",
        "the committed table's were taken while a second benchmark shared the 2 cores (upper bounds).",
        "",
        "## Zoo CNN and ViT on Fashion-MNIST",
        "",
        "512 calibration images; top-1 on the full test set (10,000 images).",
        "",
        *table(vision, [("accuracy", "top-1 %")]),
        "",
        "## all-MiniLM-L6-v2 (pretrained) on docstring pairs",
        "",
        "All 36 Linear layers of the 6 encoder blocks (word embeddings stay FP32, which is most of the size);",
        "128 calibration sentences; cosine of the mean-pooled embeddings to FP32 and recall@1 of each docstring",
        "summary retrieving its own body among 406 pairs of the Python standard library (`bitsmith zoo`).",
        "",
        *table(text, [("cosine", "cosine to FP32"), ("retrieval", "recall@1 %")]),
        "",
        "![PTQ baselines](ptq-baselines.png)",
        "",
    ]
    atomic_write_text(RESULTS / "ptq-baselines.md", "\n".join(lines))
    plot(rows)


def plot(rows: list[dict[str, Any]]) -> None:
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        key, label = ("accuracy", "top-1 %") if any("accuracy" in r for r in rows if r["model"] == name) else (
            "retrieval", "retrieval recall@1 %")  # fmt: skip
        for observer, granularity in itertools.product(OBSERVERS, GRANULARITIES):
            pts = [r for r in rows if r["model"] == name and r["observer"] == observer and r["weights"] == f"per-{granularity}"]  # fmt: skip
            ax.plot([r["setting"] for r in pts], [100 * r[key] for r in pts], marker="o",
                    linestyle="-" if granularity == "channel" else "--", label=f"{observer}, per-{granularity}")  # fmt: skip
        fp32 = next(r for r in rows if r["model"] == name and r["setting"] == "FP32")
        ax.axhline(100 * fp32[key], color="black", linewidth=1, label="FP32")
        ax.set_title(f"{name}: PTQ {label}")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, "ptq-baselines.png")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-only"]:  # re-render the table and plot from the saved rows
        write(Rows(RESULTS / "ptq-baselines.json").rows)
    else:
        run(sys.argv[1:] or ["cnn", "vit", "minilm"])
        write(Rows(RESULTS / "ptq-baselines.json").rows)  # every model's rows, not only the ones just measured
