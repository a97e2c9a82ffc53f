"""Reports: ``report.json`` / ``report.md`` for one run, plots, and comparison across runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bitsmith.files import atomic_write, atomic_write_text, check_run  # noqa: E402

METRIC_COLUMNS = [
    ("accuracy", "top-1 %", lambda v: f"{100 * v:.2f}"),
    ("psnr", "PSNR dB", lambda v: f"{v:.2f}"),
    ("cosine", "cosine to FP32", lambda v: f"{v:.4f}"),
    ("retrieval", "recall@1 %", lambda v: f"{100 * v:.2f}"),
    ("critical_accuracy", "critical top-1 %", lambda v: f"{100 * v:.2f}"),
    ("perplexity", "ppl Persuasion", lambda v: f"{v:.2f}"),
    ("perplexity_docs", "ppl Python docs", lambda v: f"{v:.2f}"),
    ("perplexity_own", "ppl (your text)", lambda v: f"{v:.2f}"),
    ("kl", "KL to FP32", lambda v: f"{v:.4f}"),
    ("fid_zoo_cnn", "FID (zoo-CNN features)", lambda v: f"{v:.3f}"),
    ("kid_zoo_cnn", "KID (zoo-CNN features)", lambda v: f"{v:.4f}"),
    ("noise_mse", "noise MSE vs FP32", lambda v: f"{v:.5f}"),
    ("noise_mse_t0", "noise MSE at t = 0", lambda v: f"{v:.5f}"),
    ("noise_mse_without_t0", "noise MSE, t > 0", lambda v: f"{v:.5f}"),
    ("top1_agreement", "top-1 agree %", lambda v: f"{100 * v:.1f}"),
    ("size_bytes", "size (KB)", lambda v: f"{v / 1024:.1f}"),
    ("file_bytes", "checkpoint file (KB)", lambda v: f"{v / 1024:.1f}"),
    ("avg_weight_bits", "avg w bits", lambda v: f"{v:.2f}"),
    ("sparsity", "zero weights %", lambda v: f"{100 * v:.1f}"),
    ("bops", "GBOPs", lambda v: f"{v / 1e9:.2f}"),
    ("latency_ms", "latency ms", lambda v: f"{v:.2f}"),
]


HEADLINE = {
    "accuracy",
    "psnr",
    "cosine",
    "retrieval",
    "perplexity",
    "perplexity_docs",
    "perplexity_own",
    "kl",
    "fid_zoo_cnn",
    "noise_mse",
}


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure atomically and close it."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=110))
    plt.close(fig)
    return path


LOWER_IS_BETTER = {"perplexity", "FID (zoo-CNN features)"}  # quality labels where a smaller value is better


def quality(metrics: dict[str, Any]) -> tuple[str, float]:
    """The headline quality metric of a run, as (label, value): top-1, perplexity, FID, PSNR, else recall@1."""
    if metrics.get("accuracy") is not None:
        return "top-1 %", 100 * metrics["accuracy"]
    for key in ("perplexity", "perplexity_own"):  # the built-in text, or the user's (data.path)
        if metrics.get(key) is not None:
            return "perplexity", metrics[key]
    if metrics.get("fid_zoo_cnn") is not None:
        return "FID (zoo-CNN features)", metrics["fid_zoo_cnn"]
    if metrics.get("psnr") is not None:
        return "PSNR dB", metrics["psnr"]
    if metrics.get("retrieval") is None:  # an encoder on a single text column: no pairs to retrieve
        return "cosine to FP32 %", 100 * metrics["cosine"]
    return "recall@1 %", 100 * metrics["retrieval"]


def headline(base: dict[str, Any], comp: dict[str, Any]) -> str:
    """One line: quality, size and bits before -> after."""
    parts = [f"{title} {fmt(base[key])} -> {fmt(comp[key])}" for key, title, fmt in METRIC_COLUMNS if key in HEADLINE
             and comp.get(key) is not None and base.get(key) is not None]  # fmt: skip
    parts.append(f"size {base['size_bytes'] / 1024:.1f} KB -> {comp['size_bytes'] / 1024:.1f} KB")
    if comp.get("file_bytes") is not None:
        parts.append(f"checkpoint file {comp['file_bytes'] / 1024:.1f} KB")
    parts.append(f"avg weight bits {comp['avg_weight_bits']:.2f}")
    if comp.get("sparsity", 0) >= 0.005:
        parts.append(f"zero weights {100 * comp['sparsity']:.1f}%")
    return ", ".join(parts)


def _shown(key: str, value: Any) -> bool:
    """Whether a metric earns its column: present, and for sparsity not (almost) zero."""
    return value is not None and not (key == "sparsity" and value < 0.005)


def metrics_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown table of named metric dicts: the columns any row has (missing values shown as -)."""
    columns = [c for c in METRIC_COLUMNS if any(_shown(c[0], metrics.get(c[0])) for _, metrics in rows)]
    header = "| run | " + " | ".join(title for _, title, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for name, metrics in rows:
        cells = [fmt(metrics[key]) if metrics.get(key) is not None else "-" for key, _, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layers_table(layers: list[dict[str, Any]]) -> str:
    lines = ["| layer | type | w bits | a bits | params | sparsity |", "|---|---|---|---|---|---|"]
    for layer in layers:
        lines.append(
            f"| {layer['name']} | {layer['type']} | {layer['weight_bits']:g} | {layer['act_bits']} | "
            f"{layer['params']:,} | {100 * layer['sparsity']:.1f}% |"
        )
    return "\n".join(lines)


def plot_layers(layers: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Per-layer weight bit-width bars (quantized activations' bits as dots) and size bars."""
    names = [layer["name"] for layer in layers]
    sparse = any(layer["sparsity"] >= 0.005 for layer in layers)
    fig, axes = plt.subplots(
        3 if sparse else 2, 1, figsize=(max(6, 0.45 * len(names)), 8 if sparse else 6), sharex=True
    )
    ax_bits, ax_size = axes[0], axes[-1]
    if sparse:  # pruned runs: the bits stay 32, the zeros are what changed
        axes[1].bar(names, [100 * layer["sparsity"] for layer in layers], color="tab:gray")
        axes[1].set_ylabel("sparsity %")
    ax_bits.bar(names, [layer["weight_bits"] for layer in layers], color="tab:blue", label="weights")
    quantized = [(layer["name"], layer["act_bits"]) for layer in layers if layer["act_bits"] < 32]
    if quantized:
        ax_bits.plot(*zip(*quantized, strict=True), "o", color="black", label="activations")
        ax_bits.legend(fontsize=8)
    ax_bits.set_ylabel("bits")
    ax_bits.set_title(title)
    ax_size.bar(names, [layer["size_bits"] / 8 / 1024 for layer in layers], color="tab:orange")
    ax_size.set_ylabel("size (KB)")
    ax_size.tick_params(axis="x", rotation=75)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_accuracy_vs_size(
    points: list[tuple[str, float, float]], path: Path, title: str, ylabel: str = "top-1 accuracy (%)"
) -> Path:
    """Scatter of (name, size in KB, quality %) points."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, size_kb, acc in points:
        ax.scatter(size_kb, acc, s=40)
        ax.annotate(name, (size_kb, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model size (KB, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def run_report_writers(report: dict[str, Any]) -> dict[str, Callable[[Path], Any]]:
    """Writers of report.json, report.md and the per-layer plot of one run (for ``files.publish_run``)."""
    title = f"{report['name']}: per-layer weight bits and size"
    writers: dict[str, Callable[[Path], Any]] = {
        "report.json": lambda path: atomic_write_text(path, json.dumps(report, indent=2)),
        "report.md": lambda path: atomic_write_text(path, run_markdown(report)),
        "layers.png": lambda path: plot_layers(report["compressed"]["layers"], path, title),
    }
    if report.get("training"):
        writers["training.png"] = lambda path: plot_training(report["training"], path, f"{report['name']}: training")
    return writers


def plot_training(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Loss and (for classifiers) training top-1 per epoch."""
    epochs = [row["epoch"] for row in history]
    top1 = all("train_accuracy" in row for row in history)
    fig, axes = plt.subplots(1, 2 if top1 else 1, figsize=(9 if top1 else 4.5, 3.5), squeeze=False)
    ax_loss = axes[0, 0]
    ax_loss.plot(epochs, [row["loss"] for row in history], "o-")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (with penalties)")
    if top1:
        ax_acc = axes[0, 1]
        ax_acc.plot(epochs, [100 * row["train_accuracy"] for row in history], "o-", color="tab:green")
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel("training top-1 %")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def run_markdown(report: dict[str, Any]) -> str:
    """report.md of one run."""
    rows = [("FP32 baseline", report["baseline"]["metrics"]), compressed_row(report)]
    deployed = report.get("deployed")
    if deployed:
        rows.append((f"{report['name']}, deployed on {deployed['backend']}", deployed))
    md = [
        f"# {report['name']}",
        "",
        f"Model `{report['model']}`, {report['data']['eval_examples']} test examples of {report['data'].get('name')}, "
        f"{report['data']['calib_examples']} calibration examples{' (smoke run)' if report['smoke'] else ''}.",
        "",
        metrics_table(rows),
        "",
        "Latency is the median of repeated forward passes after warm-up, all timed in this run. A fake-quant",
        "row simulates quantization in float, so its latency (in report.json) says nothing about the speed of",
        "the compressed model; the deployed row, when present, runs integer kernels (`export.deploy` in the",
        "recipe, or `bitsmith deploy`).",
        "",
        *timing_lines(report),
        "## Layers",
        "",
        layers_table(report["compressed"]["layers"]),
        "",
        "![per-layer bits](layers.png)",
        "",
    ]
    md += robustness_lines(report.get("robustness"))
    md += crossbar_lines(report.get("crossbar"))
    if report.get("samples"):
        md += ["## Greedy generations", "", "| prompt | FP32 | compressed |", "|---|---|---|"]
        md += [f"| {cell(s['prompt'])} | {cell(s['fp32'])} | {cell(s['compressed'])} |" for s in report["samples"]]
        md.append("")
    for method, stats in (report.get("calibration") or {}).items():
        if "peak_rss_bytes" in stats:
            md += [f"Calibration of `{method}`: {stats['seconds']:.0f} s over {stats['blocks']} blocks, process peak "
                   f"memory {stats['peak_rss_bytes'] / 2**20:.0f} MiB.", ""]  # fmt: skip
    if report.get("training"):
        md += ["## Training", "", "| epoch | loss | training top-1 % |", "|---|---|---|"]
        md += [
            f"| {row['epoch']} | {row['loss']:.4f} | "
            + (f"{100 * row['train_accuracy']:.2f} |" if "train_accuracy" in row else "— |")
            for row in report["training"]
        ]
        md += ["", "![training](training.png)", ""]
    return "\n".join(md)


def robustness_lines(robust: dict[str, Any] | None) -> list[str]:
    """The robust-accuracy table of a run with an ``attack`` section (percent top-1)."""
    if not robust:
        return []
    base, comp = robust["baseline"], robust["compressed"]
    md = ["## Robustness", "", f"Top-1 % on {comp['examples']} test images; transfer = examples crafted on the "
          "compressed model's own weights in float (same training, no fake quantization in the gradient path), "
          "evaluated on the compressed one.", "", "| attack | FP32 | compressed | compressed, transfer |",
          "|---|---|---|---|", f"| none (clean) | {100 * base['clean']:.2f} | {100 * comp['clean']:.2f} | |"]  # fmt: skip
    for b, c in zip(base["results"], comp["results"], strict=True):
        transfer = f"{100 * c['transfer_accuracy']:.2f}" if c["transfer_accuracy"] is not None else ""
        md.append(f"| {c['attack']} | {100 * b['accuracy']:.2f} | {100 * c['accuracy']:.2f} | {transfer} |")
    strengths = sorted({(r["eps"], r["norm"]) for r in comp["results"]})
    if len(comp["results"]) > len(strengths):  # several attacks per eps: the least accuracy any of them left
        from bitsmith.robust.evaluate import AttackResult, robust_accuracy

        def worst(results: list[dict[str, Any]], eps: float, norm: str) -> str:
            least = min(robust_accuracy(AttackResult(**r)) for r in results if (r["eps"], r["norm"]) == (eps, norm))
            return f"{100 * least:.2f}"

        md += [f"| **strongest attack** L{norm} eps {eps:g} | {worst(base['results'], eps, norm)} | "
               f"{worst(comp['results'], eps, norm)} | |" for eps, norm in strengths]  # fmt: skip
    return md + [""] + [f"**Warning:** {flag}" for flag in comp["flags"]] + [""]


def crossbar_lines(crossbar: dict[str, Any] | None) -> list[str]:
    """The accuracy-under-crossbar-noise table of a run with a ``crossbar`` section (percent top-1)."""
    if not crossbar:
        return []
    d = crossbar["design"]
    adc = f"{d['adc_bits']}-bit ADC" if d["adc_bits"] else "ideal ADC"
    md = ["## On ReRAM crossbars", "", f"Top-1 % on {crossbar['examples']} test images, mean +- spread over "
          f"{crossbar['draws']} read-noise draws; crossbars of {d['rows']} rows, {d['cell_bits']}-bit cells, "
          f"{d['weight_bits']}-bit weights, {adc}.", "", "| read noise | FP32 | compressed |", "|---|---|---|"]  # fmt: skip
    for level in crossbar["levels"]:
        f, c = level["fp32"], level["compressed"]
        md.append(f"| {level['noise']:g} | {100 * f['mean']:.2f} +- {100 * f['std']:.2f} | "
                  f"{100 * c['mean']:.2f} +- {100 * c['std']:.2f} |")  # fmt: skip
    return md + [""]


def cell(text: str) -> str:
    """Text as one markdown table cell (pipes escaped, newlines as spaces)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def simulated(report: dict[str, Any]) -> bool:
    """Whether the compressed model is fake-quantized (quantization simulated in float, so its latency is no
    measure of the compressed model's speed; the deployed row is)."""
    layers = report["compressed"].get("layers") or []
    return any(layer["weight_bits"] < 32 or layer["act_bits"] < 32 for layer in layers)


def compressed_row(report: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The compressed model's table row; a fake-quantized model's float latency is left out."""
    metrics = report["compressed"]["metrics"]
    if simulated(report):
        return f"{report['name']} (fake-quant)", {**metrics, "latency_ms": None}
    return report["name"], metrics


def _timings(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The timings a run's tables show: FP32, the compressed model unless fake-quantized, the deployed one."""
    sides = [("FP32", report["baseline"]), ("compressed", None if simulated(report) else report["compressed"]),
             ("deployed", report.get("deployed"))]  # fmt: skip
    return [(name, side["timing"]) for name, side in sides if side and side.get("timing")]


def timing_warnings(report: dict[str, Any]) -> list[str]:
    """A line for an unreliable timing and one for a deployed model that runs nothing in integer kernels."""
    lines = []
    unreliable = [f"{name}: {t['unreliable']}" for name, t in _timings(report) if t.get("unreliable")]
    if unreliable:
        lines.append(f"**Timing unreliable** ({'; '.join(unreliable)}): the latency column is no speed-up; rerun "
                     "on an idle machine.")  # fmt: skip
    deployed = report.get("deployed")
    if deployed and not deployed.get("integer_layers"):
        lines.append("**Nothing runs in integer kernels** in the deployed model (no quantized layer, or every one "
                     "fell back to float): its latency is float's.")  # fmt: skip
    return lines


def timing_lines(report: dict[str, Any]) -> list[str]:
    """The spread and load of every timing in a run, then ``timing_warnings``, as report.md lines."""
    timings = _timings(report)
    if not timings:
        return []
    spreads = ", ".join(f"{name} {t['median_ms']:.2f} ms (min {t['min_ms']:.2f}, max {t['max_ms']:.2f}, "
                        f"{t['runs']} runs, load {t['load']})" for name, t in timings)  # fmt: skip
    lines = [f"Timings: {spreads}; {timings[0][1]['cores']} cores.", ""]
    for warning in timing_warnings(report):
        lines += [warning, ""]
    return lines


def compare_runs(dirs: list[Path], out: Path | None = None) -> str:
    """A markdown table (and, with ``out``, a plot) comparing run directories of one model and task; each
    run's deployed model, when it has one, gets its own row."""
    reports = [check_run(Path(directory)) for directory in dirs]
    groups: dict[str, list[str]] = {}
    for directory, report in zip(dirs, reports, strict=True):
        groups.setdefault(f"{report['model']} on {report['data'].get('name')}", []).append(str(directory))
    if len(groups) > 1:
        found = "; ".join(f"{kind}: {', '.join(folders)}" for kind, folders in sorted(groups.items()))
        raise ValueError(f"report compares runs of one model and task; got {found}. Report each group on its own")
    rows: list[tuple[str, dict[str, Any]]] = [("FP32 baseline", reports[0]["baseline"]["metrics"])]
    points = []
    notes = []
    for report in reports:
        rows.append(compressed_row(report))
        deployed = report.get("deployed")
        if deployed:
            rows.append((f"{report['name']}, deployed on {deployed['backend']}", deployed))
        notes += [f"{report['name']}: {line}" for line in timing_warnings(report)]
    for name, metrics in rows:
        if metrics.get("size_bytes") is not None:  # a deployed row has the size of its run's checkpoint
            label, value = quality(metrics)
            points.append((name, metrics["size_bytes"] / 1024, value))
    notes.append("Latency: medians of each run's own timing; fake-quant rows (quantization simulated in float) "
                 "have none, their deployed rows run integer kernels.")  # fmt: skip
    table = "\n\n".join([metrics_table(rows), *notes])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        plot = plot_accuracy_vs_size(points, out / "accuracy_vs_size.png", f"{label} vs size", label)
        atomic_write_text(out / "comparison.md", f"# Comparison\n\n{table}\n\n![accuracy vs size]({plot.name})\n")
    return table
