"""Training-time quantization on the zoo CNN: top-1 vs average weight bits.

Uniform QAT (STE at 4 bits, LSQ at 4 / 3 / 2 weight bits) with 8-bit activations, stem and classifier at 8
bits, fine-tuned from the FP32 checkpoint; BSQ and MSQ (two strengths each) from an 8-bit start (stem and
classifier at 8 bits by STE QAT, the last epoch a fine-tune at the found precision, BSQ's with the
paper's fixed scheme: float weights, STE quantizer, frozen step; MSQ adjusts its
precision every 100 steps); CSQ from 6 bit positions towards a 3- or 2.5-bit budget (its selection hard
in the last epoch). Each "-> LSQ" row takes the
per-layer precision one of them found at <= 4 average bits (its stored code bits) and trains it with the uniform rows' LSQ
QAT and budget: the same training at the found allocation instead of a uniform one. The bit-level rows run in
a fresh process each; after loading the data the process's peak resident memory is reset, and the row
reports how far compressing and training raised it (*training MB*); they also report
the trainable values of the quantized layers and the seconds per epoch. HERO has its own benchmark
(``benchmarks/hero.py``).

Regenerate: ``make bench-bit-level`` (``python benchmarks/bit_level.py [--epochs N] [--bit-epochs M] [--part P]``). Writes
``docs/results/bit-level.{md,png,json}``; the JSON keeps finished rows (delete it to re-measure).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import multiprocessing
import re
import resource
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, Rows, load, save_figure  # noqa: E402

from bitsmith import compress  # noqa: E402
from bitsmith.eval.cost import model_cost  # noqa: E402
from bitsmith.files import atomic_write_text  # noqa: E402
from bitsmith.methods.qat.bsq import BSQ  # noqa: E402
from bitsmith.methods.qat.csq import CSQ  # noqa: E402
from bitsmith.methods.qat.msq import MSQ  # noqa: E402
from bitsmith.methods.qat.qat import QAT  # noqa: E402
from bitsmith.train import TrainConfig, fit  # noqa: E402
from bitsmith.zoo import cache_dir  # noqa: E402

QAT_RUNS = [("ste", 4), ("lsq", 4), ("lsq", 3), ("lsq", 2)]
# (family, alpha for BSQ / MSQ or lam for CSQ, CSQ's target bits or BSQ's fine-tune)
BIT_LEVEL = [("BSQ", 0.5, "fixed"), ("BSQ", 1.0, "fixed"), ("BSQ", 1.0, "planes"), ("MSQ", 0.005, None),
             ("MSQ", 0.01, None), ("CSQ", 1e-2, 3.0), ("CSQ", 1e-3, 3.0), ("CSQ", 1e-2, 2.5)]  # fmt: skip
PLANES = " planes fine-tune"  # BSQ's ablation: the last epoch trains the bit planes
MAX_FOUND_BITS = 4.0  # found allocations retrained with LSQ: those in the uniform rows' range
ENDS_AT_8 = {"overrides": {"@first": {"w_bits": 8}, "@last": {"w_bits": 8}}}


def run(epochs: int, bit_epochs: int, part: str = "all") -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    rows = Rows(RESULTS / "bit-level.json")
    base, task = load("cnn", calib_size=256)
    fp32 = task.evaluate(base)["accuracy"]  # rows measured on another FP32 checkpoint say so in the table
    if not rows.done(run="FP32"):
        rows.add({"run": "FP32", "accuracy": fp32, "avg_bits": 32.0, "seconds": 0.0})
    rows.extra = {"fp32": fp32}
    config = TrainConfig(epochs=epochs, optimizer="adamw", lr=5e-4, weight_decay=0.0)
    for step, bits in QAT_RUNS if part in ("all", "uniform") else []:
        method = QAT(w_bits=bits, a_bits=8, step=step, where=ENDS_AT_8)
        qat_row(rows, base, task, config, f"QAT {step.upper()} W{bits}A8", method)
    for family, strength, option in BIT_LEVEL if part in ("all", "bit-level") else []:
        if rows.done(run=row_label(family, strength, option), epochs=bit_epochs + 1):
            continue
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh process: its own peak memory
            rows.add(pool.apply(bit_level_row, (family, strength, option, bit_epochs)))
        print(rows.rows[-1], flush=True)
    costs = Rows(RESULTS / "bit-level-cost.json")
    for model_name, family in itertools.product(COST_MODELS, ("BSQ", "MSQ")) if part in ("all", "cost") else []:
        if not costs.done(model=model_name, run=family):
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                costs.add(pool.apply(cost_row, (model_name, family)))
            print(costs.rows[-1], flush=True)
    found_runs = [
        r for r in rows.rows if "code_bits" in r and r["avg_bits"] <= MAX_FOUND_BITS and PLANES not in r["run"]
    ]
    for found in found_runs if part in ("all", "found") else []:
        where = {"overrides": {**ENDS_AT_8["overrides"], **{n: {"w_bits": b} for n, b in found["code_bits"].items()}}}
        qat_row(rows, base, task, config, f"{found['run']} -> LSQ", QAT(w_bits=8, a_bits=8, step="lsq", where=where))
    return rows.rows


def qat_row(rows: Rows, base: torch.nn.Module, task: Any, config: TrainConfig, label: str, method: QAT) -> None:
    """Train one QAT model from the FP32 checkpoint (unless its row exists) and add its row."""
    if rows.done(run=label, epochs=config.epochs):
        return
    model = copy.deepcopy(base)
    start = time.perf_counter()
    compress(model, method, task.calibration, finalize=False)
    train(model, task, config, [method], label)
    method.finalize(model)  # folds the batch norms into the quantized convolutions
    seconds = time.perf_counter() - start
    avg_bits = model_cost(model).totals["avg_weight_bits"]
    rows.add({"run": label, "epochs": config.epochs, **task.evaluate(model), "avg_bits": avg_bits,
              "seconds": seconds})  # fmt: skip
    print(rows.rows[-1], flush=True)


def row_label(family: str, strength: float, option: Any = None) -> str:
    if family == "CSQ":
        return f"CSQ lam={strength:g}" + (f" target={option:g}" if option != 3.0 else "")
    return f"{family} alpha={strength:g}" + (PLANES if option == "planes" else "")


def bit_level_method(family: str, strength: float, option: Any, where: dict[str, Any] | None = None) -> BSQ | MSQ | CSQ:
    inner: dict[str, Any] = {"a_bits": 8, "where": where or {"exclude": ["@first", "@last"]}}
    if family == "CSQ":
        return CSQ(start_bits=6, target_bits=option, lam=strength, **inner)
    if family == "MSQ":  # precision adjusted every 100 steps: 3 epochs hold only two epoch boundaries
        return MSQ(alpha=strength, start_bits=8, finetune_epochs=1, adjust_steps=100, **inner)
    return BSQ(alpha=strength, start_bits=8, finetune_epochs=1, finetune=option, **inner)


def trainable_values(model: torch.nn.Module, method: BSQ | MSQ | CSQ) -> int:
    """Trainable values of the method's quantized layers (weights or bit planes, steps, biases)."""
    layers = [model.get_submodule(n) for n in method.precision(model)]
    return sum(p.numel() for layer in layers for p in layer.parameters() if p.requires_grad)


def bit_level_row(family: str, strength: float, option: Any, epochs: int) -> dict[str, Any]:
    """Train one BSQ / MSQ / CSQ model (stem and classifier at 8 bits by STE QAT) and measure it."""
    torch.set_num_threads(2)
    base, task = load("cnn", calib_size=256)
    model = copy.deepcopy(base)
    method = bit_level_method(family, strength, option)
    label = row_label(family, strength, option)
    ends = QAT(w_bits=8, a_bits=8, step="ste", where={"include": ["@first", "@last"]})
    baseline_mb = reset_peak_memory()
    start = time.perf_counter()
    compress(model, [method, ends], task.calibration, finalize=False)
    trainable = trainable_values(model, method)
    config = TrainConfig(epochs=epochs + 1, optimizer="sgd", lr=0.01, weight_decay=0.0)
    train(model, task, config, [method, ends], label)
    training_mb = peak_memory_mb() - baseline_mb
    method.finalize(model)
    ends.finalize(model)
    seconds = time.perf_counter() - start
    metrics, totals, precision = task.evaluate(model), model_cost(model).totals, method.precision(model)
    return {"run": label, "epochs": epochs + 1, **metrics,
            "avg_bits": totals["avg_weight_bits"], "seconds": seconds, "stored_bits": totals["avg_code_bits"],
            "seconds_per_epoch": seconds / (epochs + 1), "trainable": trainable,
            "training_mb": training_mb, "layer_bits": precision,
            "code_bits": {n: model.get_submodule(n).weight_q.code_bits for n in precision}}  # fmt: skip


COST_MODELS = {"cnn": {"exclude": ["@first", "@last"]}, "minilm": {"include": ["encoder.*"]}}
COST_STEPS = 5


def cost_row(model_name: str, family: str) -> dict[str, Any]:
    """Per-step training cost of BSQ or MSQ from an 8-bit start: trainable values of the quantized layers,
    peak memory above the loaded model and data, median seconds of ``COST_STEPS`` SGD steps (after one)."""
    torch.set_num_threads(2)
    model, task = load(model_name, calib_size=8)
    if model_name == "minilm":  # 8 sentences; the loss pulls the hidden states to the FP32 ones
        batch = task.example(8)
        with torch.no_grad():
            target = model(**batch).last_hidden_state

        def loss_fn() -> torch.Tensor:
            return torch.nn.functional.mse_loss(model(**batch).last_hidden_state, target)
    else:  # one training batch of 128 images
        images, labels = task.train[0][:128], task.train[1][:128]

        def loss_fn() -> torch.Tensor:
            return torch.nn.functional.cross_entropy(model(images), labels)

    strength, option = next((a, o) for f, a, o in BIT_LEVEL if f == family)  # the first row of the family
    method = bit_level_method(family, strength, option, COST_MODELS[model_name])
    baseline_mb = reset_peak_memory()
    compress(model, method, task.calibration[:1], finalize=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    seconds = []
    for _ in range(COST_STEPS + 1):
        start = time.perf_counter()
        loss = loss_fn() + method.penalty(model, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return {"model": model_name, "run": family, "trainable": trainable_values(model, method),
            "peak_mb": peak_memory_mb() - baseline_mb, "step_seconds": sorted(seconds[1:])[COST_STEPS // 2]}  # fmt: skip


STATUS = Path("/proc/self/status")


def _status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", STATUS.read_text()).group(1)) / 1024  # type: ignore[union-attr]


def reset_peak_memory() -> float:
    """Reset the process's peak resident memory (Linux ``clear_refs``) and return the resident MB now:
    the later peak minus this is what compressing and training added on top of the loaded data."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mb("VmRSS")
    except OSError:  # not Linux: the whole process's peak so far
        return peak_memory_mb()


def peak_memory_mb() -> float:
    """Peak resident MB since the last reset (``ru_maxrss`` where ``/proc`` has no such field)."""
    return _status_mb("VmHWM") if STATUS.is_file() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(model: torch.nn.Module, task: Any, config: TrainConfig, methods: list[Any], label: str) -> None:
    """``fit`` with a per-run resume file in the cache (a killed benchmark continues the run)."""
    state = cache_dir() / "bench" / f"bit-level-{label.replace(' ', '_')}-e{config.epochs}.pt"
    fit(model, *task.train, config, methods, checkpoint=state)
    state.unlink()


def stored(row: dict[str, Any]) -> float:
    """Stored bits per weight (uniform rows: their average bits)."""
    return row.get("stored_bits", row["avg_bits"])


def cost_table(rows: list[dict[str, Any]]) -> list[str]:
    """BSQ vs MSQ training cost per step, on the CNN and on MiniLM's encoder (``--part cost``)."""
    if not rows:
        return []
    lines = ["", "## Training cost per step: BSQ vs MSQ", "",
             "One fresh process per row; both from an 8-bit start. CNN: the inner layers, a batch of 128 images.",
             "MiniLM (all-MiniLM-L6-v2): its 36 encoder Linears, 8 sentences, an MSE to the FP32 hidden states.",
             f"*peak MB*: how far compressing and {COST_STEPS + 1} SGD steps (momentum) raised the process's peak",
             "resident memory above the loaded model and data; *s / step*: the median step after the first.",
             "MSQ's Hutchinson traces run only at its precision adjustments and are not in these steps.", "",
             "| model | method | trainable | peak MB | s / step |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['run']} | {r['trainable']:,} | {r['peak_mb']:,.0f} | {r['step_seconds']:.3f} |"
        )
    return lines


def write(rows: list[dict[str, Any]]) -> None:
    lines = [
        "# Training-time quantization (zoo CNN, Fashion-MNIST)",
        "",
        "Every row fine-tunes the FP32 checkpoint on the 60,000 training images with 8-bit activations and",
        'the stem and classifier weights at 8 bits. Uniform QAT and "-> LSQ" rows: AdamW (lr 5e-4, cosine),',
        "batch norms folded into the quantized convolutions. BSQ / MSQ / CSQ: SGD (lr 0.01, cosine), their",
        "own quantizers and schedules (BSQ and MSQ fine-tune the last epoch at the found precision, BSQ with",
        "float weights and an STE quantizer at its frozen step as the paper does; CSQ's",
        "selection is hard in the last epoch). Top-1 on the 10,000 test images; seconds on 2 threads",
        "including training. Regenerate: `make bench-bit-level`. Every row was trained alone on an otherwise",
        "idle 2-core machine, so their seconds compare. CSQ's *avg weight bits* is the span of its selected",
        "bit positions (what a layer stores); the paper counts the selected positions (fewer, see csq.md).",
        "",
        "BSQ / MSQ / CSQ: *trainable* counts the trainable values of their quantized layers (weights or bit",
        "planes, steps, biases), *training MB* how far compressing and training raised the resident memory of",
        "the process above what it held with the data loaded (its peak, reset after loading). Under SGD with",
        "momentum each trainable value costs 12 bytes of state (value, gradient, momentum).",
        'A "-> LSQ" row trains the per-layer precision that run found with the uniform rows\' LSQ QAT and budget.',
        "*avg weight bits* is each paper's count (BSQ / MSQ / CSQ: magnitude bits, their sign-magnitude codes",
        "store one more); *stored bits / weight* is what the codes take, the same measure for every row.",
        "*from FP32 %* is the top-1 of the FP32 checkpoint the row fine-tuned (the zoo CNN retrained with the",
        "same seed and recipe on another day gave 92.72 instead of 92.65); *load* the 1-minute load average",
        "when the row was written (a row training alone on 2 threads shows about 2).",
        "",
        "| run | epochs | avg weight bits | stored bits / weight | top-1 % | from FP32 % | seconds | s / epoch "
        "| trainable | training MB | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = next(r["accuracy"] for r in rows if r["run"] == "FP32")
    order = ["FP32", "QAT", "BSQ", "MSQ", "CSQ"]
    rows = sorted(
        rows, key=lambda r: (next(i for i, f in enumerate(order) if r["run"].startswith(f)), "->" in r["run"])
    )
    for r in rows:
        extra = " | ".join(f"{r[k]:,.0f}" if k in r else "-" for k in ("seconds_per_epoch", "trainable", "training_mb"))
        load = f"{r['load'][0]:.2f}" if r.get("load") else "-"
        lines.append(f"| {r['run']} | {r.get('epochs', '-')} | {r['avg_bits']:.2f} | {stored(r):.2f} | "
                     f"{100 * r['accuracy']:.2f} | {100 * r.get('fp32', base):.2f} | "
                     f"{r['seconds']:.0f} | {extra} | {load} |")  # fmt: skip
    bit_rows = [r for r in rows if "layer_bits" in r]
    if bit_rows:
        names = list(bit_rows[0]["layer_bits"])
        lines += ["", "Per-layer weight bits found:", "", "| run | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]  # fmt: skip
        lines += [
            f"| {r['run']} | " + " | ".join(str(r["layer_bits"].get(n, "-")) for n in names) + " |" for r in bit_rows
        ]
    lines += cost_table(Rows(RESULTS / "bit-level-cost.json").rows)
    lines += ["", "![accuracy vs bits](bit-level.png)", ""]
    atomic_write_text(RESULTS / "bit-level.md", "\n".join(lines))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    fp32 = next(r for r in rows if r["run"] == "FP32")
    ax.axhline(100 * fp32["accuracy"], color="black", linewidth=1, label="FP32")
    families = {f: (lambda r, f=f: r["run"].startswith(f) and "->" not in r["run"] and PLANES not in r["run"])
                for f in ("QAT STE", "QAT LSQ", "BSQ", "MSQ", "CSQ")}  # fmt: skip
    families["BSQ, planes fine-tune"] = lambda r: PLANES in r["run"]
    families["found bits -> LSQ"] = lambda r: "->" in r["run"]
    for family, member in families.items():
        pts = sorted((r for r in rows if member(r)), key=stored)
        ax.plot([stored(r) for r in pts], [100 * r["accuracy"] for r in pts], marker="o", label=family,
                linestyle="--" if family.startswith("found") else "-")  # fmt: skip
    ax.set_xlabel("stored bits per weight")
    ax.set_ylabel("top-1 %")
    ax.set_title("zoo CNN: accuracy vs stored weight bits")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, "bit-level.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="uniform QAT and '-> LSQ' epochs")
    parser.add_argument("--bit-epochs", type=int, default=2, help="BSQ / MSQ / CSQ epochs before the last one")
    parser.add_argument("--write-only", action="store_true", help="re-render from the saved rows")
    parser.add_argument("--part", choices=["all", "uniform", "bit-level", "cost", "found"], default="all",
                        help="uniform QAT rows, BSQ / MSQ / CSQ rows, BSQ vs MSQ step cost (CNN, MiniLM), "
                             "or the '-> LSQ' rows of finished runs")  # fmt: skip
    args = parser.parse_args()
    write(Rows(RESULTS / "bit-level.json").rows if args.write_only else run(args.epochs, args.bit_epochs, args.part))
