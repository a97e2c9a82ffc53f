"""Mixed precision vs uniform precision at equal weight size (PTQ, A8), zoo CNN and ViT on Fashion-MNIST.

Uniform W2/W3/W4/W8 per-channel min-max PTQ vs ``mixed`` allocations (Hessian trace, top Hessian
eigenvalue, empirical Fisher trace, error proxy) from {2, 3, 4, 6, 8} bits at the average weight bits
of uniform W3 and W4. Regenerate: ``make bench-mixed`` (``python benchmarks/mixed_precision.py
[cnn vit]``). Writes ``docs/results/mixed-precision.{md,png,json}``.
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
from common import RESULTS, Rows, load  # noqa: E402

from bitsmith import compress  # noqa: E402
from bitsmith.eval.cost import model_cost  # noqa: E402
from bitsmith.eval.report import atomic_write_text  # noqa: E402
from bitsmith.method import Method  # noqa: E402
from bitsmith.methods.mixed import MixedPrecision  # noqa: E402
from bitsmith.methods.ptq import PTQ  # noqa: E402

UNIFORM = [8, 4, 3, 2]
BUDGETS = [4.0, 3.0]
SENSITIVITIES = ["hessian", "eigen", "fisher", "error"]


def run(models: list[str]) -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    rows = Rows(RESULTS / "mixed-precision.json")
    for name in models:
        base, task = load(name, calib_size=256)
        if not rows.done(model=name, run="FP32"):
            size = model_cost(base).totals["size_bytes"]
            rows.add({"model": name, "run": "FP32", **task.evaluate(base), "avg_bits": 32.0, "size": size,
                      "seconds": 0.0})  # fmt: skip
        runs: dict[str, Method] = {f"uniform W{b}": PTQ(w_bits=b, a_bits=8) for b in UNIFORM}
        for budget in BUDGETS:
            for kind in SENSITIVITIES:
                runs[f"mixed {kind} {budget:g} bits"] = MixedPrecision(sensitivity=kind, avg_bits=budget, a_bits=8)
        for label, method in runs.items():
            if rows.done(model=name, run=label):
                continue
            model = copy.deepcopy(base)
            start = time.perf_counter()
            compress(model, method, task.calibration)
            seconds = time.perf_counter() - start
            cost = model_cost(model).totals
            extra = {"allocation": method.allocation} if isinstance(method, MixedPrecision) else {}
            rows.add({"model": name, "run": label, **task.evaluate(model), "avg_bits": cost["avg_weight_bits"],
                      "size": cost["size_bytes"], "seconds": seconds, **extra})  # fmt: skip
            print({k: v for k, v in rows.rows[-1].items() if k != "allocation"}, flush=True)
    return [r for r in rows.rows if r["model"] in models]


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
    for r in rows:
        lines.append(f"| {r['model']} | {r['run']} | {r['avg_bits']:.2f} | {r['size'] / 1024:.1f} | "
                     f"{100 * r['accuracy']:.2f} | {r['seconds']:.1f} |")  # fmt: skip
    lines += ["", "![mixed precision](mixed-precision.png)", ""]
    atomic_write_text(RESULTS / "mixed-precision.md", "\n".join(lines))
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
    fig.tight_layout()
    fig.savefig(RESULTS / "mixed-precision.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-only"]:
        write(Rows(RESULTS / "mixed-precision.json").rows)
    else:
        run(sys.argv[1:] or ["cnn", "vit"])
        write(Rows(RESULTS / "mixed-precision.json").rows)  # every model's rows, not only the ones just measured
