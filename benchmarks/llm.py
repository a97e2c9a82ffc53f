"""LLM weight quantization on SmolLM2-135M-Instruct: RTN / GPTQ / AWQ at several widths and groups, SmoothQuant
W8A8, and a lossless sanity row at the GGUF's own block structure. Writes docs/results/llm.{json,md,png}.

Every row: perplexity on the first 80 windows (512 tokens, 40,880 scored tokens) of *Persuasion* and of the
Python library docs, KL to FP32 and top-1 agreement on the first 16 Persuasion windows, the packed size of the
quantized model (``model_cost``), quantization seconds and the calibration's peak memory. Calibration: 32
random 512-token windows of *Emma* + *Mansfield Park* (seed 0). Rows resume (``Rows``); delete a row from
llm.json to re-measure it. ``python benchmarks/llm.py --write-only`` rewrites the page from the JSON.

SmolLM2's hidden size (576) is not a multiple of 128, so group 128 is refused for it (it would split a row's
inputs unevenly): the tables use groups of 64 and 32 where the issue names 128 and 64.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, Rows, bench_parser, save_figure

from bitsmith.eval.cost import model_cost
from bitsmith.eval.lm import LanguageModelTask, language_model_task
from bitsmith.method import build_method, compress
from bitsmith.sequential import peak_rss, reset_peak_rss

MODEL = "smollm2"
EVAL_WINDOWS, CALIB_WINDOWS, CALIB_BATCH, KL_WINDOWS = 80, 32, 8, 16
BLOCKS = {"include": ["model.layers.*"]}
ROWS = RESULTS / "llm.json"

# (label, bits, group) in the order they are measured: the targets' rows first
WEIGHT_ONLY = [(4, 64), (3, 64), (4, 0), (3, 0), (4, 32), (3, 32), (2, 32), (2, 64)]
METHODS = ("rtn", "gptq", "awq")


def recipe(method: str, bits: int, group: int) -> list[dict[str, Any]]:
    if method == "rtn":
        return [{"name": "rtn", "bits": bits, "group_size": group, "where": BLOCKS}]
    return [{"name": method, "bits": bits, "group_size": group, "where": BLOCKS}]


def rtn_per_channel(bits: int) -> list[dict[str, Any]]:
    """RTN per output channel is ``ptq`` weight-only with asymmetric per-channel min-max."""
    return [{"name": "ptq", "w_bits": bits, "a_bits": None, "w_symmetric": False, "where": BLOCKS}]


def configurations() -> list[tuple[str, list[dict[str, Any]], dict[str, Any]]]:
    """(row name, methods, key fields) of every row."""
    out: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
        ("FP32", [], {"method": "fp32", "bits": 32, "group": 0}),
        ("RTN W4 g32 float zero (GGUF Q4_1 structure: lossless check)", [{**recipe("rtn", 4, 32)[0], "float_zero": True}],
         {"method": "gguf-check-float-zero", "bits": 4, "group": 32}),
        ("RTN W4 g32 integer zero (GGUF Q4_1 structure)", recipe("rtn", 4, 32), {"method": "gguf-check", "bits": 4, "group": 32}),
    ]  # fmt: skip
    for bits, group in WEIGHT_ONLY[:4]:
        out += weight_only_rows(bits, group)
    smooth = [{"name": "smoothquant", "alpha": 0.5, "where": BLOCKS},
              {"name": "ptq", "w_bits": 8, "a_bits": 8, "a_granularity": "token", "a_dynamic": True, "where": BLOCKS}]  # fmt: skip
    out.append(
        ("SmoothQuant W8A8 (per-token dynamic activations)", smooth, {"method": "smoothquant", "bits": 8, "group": 0})
    )
    out.append(("W8A8 without smoothing", smooth[1:], {"method": "w8a8", "bits": 8, "group": 0}))
    mixed = {"name": "mixed", "sensitivity": "fisher", "sensitivity_batches": 1, "candidates": [2, 3, 4, 8],
             "avg_bits": 3.0, "a_bits": None, "w_granularity": "group", "w_group_size": 64, "w_symmetric": False,
             "where": BLOCKS}  # fmt: skip
    out.append(("Mixed-precision GPTQ, 3.0 avg bits g64 (Fisher, bits 2/3/4/8)", [mixed, recipe("gptq", 3, 64)[0]],
                {"method": "mixed-gptq", "bits": 3, "group": 64}))  # fmt: skip
    for bits, group in WEIGHT_ONLY[4:]:
        out += weight_only_rows(bits, group)
    return out


def weight_only_rows(bits: int, group: int) -> list[tuple[str, list[dict[str, Any]], dict[str, Any]]]:
    """RTN, GPTQ and AWQ at one width and group size (0: per channel)."""
    out = []
    for method in METHODS:
        methods = rtn_per_channel(bits) if method == "rtn" and group == 0 else recipe(method, bits, group)
        label = f"{method.upper()} W{bits} {'per-channel' if group == 0 else f'g{group}'}"
        out.append((label, methods, {"method": method, "bits": bits, "group": group}))
    return out


def compress_quietly(model: torch.nn.Module, methods: list[dict[str, Any]], task: Any) -> list[Any]:
    """Build ``methods`` and compress ``model`` with them on the task's calibration (warnings silenced)."""
    built = [build_method(entry) for entry in methods]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress(model, built, task.calibration)
    return built


class Prepared:
    """Models compressed once and reused by several rows (operating points, fine-tuned starting points)."""

    def __init__(self, model: torch.nn.Module, task: Any) -> None:
        self.model, self.task = model, task
        self.cache: dict[str, tuple[torch.nn.Module, float]] = {}

    def get(self, key: str, methods: list[dict[str, Any]]) -> tuple[torch.nn.Module, float]:
        """The model compressed by ``methods`` (cached under ``key``) and the seconds that took."""
        if key not in self.cache:
            compressed = copy.deepcopy(self.model)
            start = time.perf_counter()
            compress_quietly(compressed, methods, self.task)
            self.cache[key] = compressed, time.perf_counter() - start
        return self.cache[key]


def measure(model: torch.nn.Module, task: LanguageModelTask, methods: list[dict[str, Any]]) -> dict[str, Any]:
    quantized = copy.deepcopy(model)
    reset_peak_rss()
    rss_before = peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    compress_quietly(quantized, methods, task)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = peak_rss()
    cost = model_cost(quantized, task.first(task.example(1)))
    metrics = task.evaluate(quantized)
    samples = task.samples(quantized)
    del quantized
    return {**metrics, "quant_seconds": round(seconds, 1), "quant_cpu_seconds": round(cpu_seconds, 1),
            "calib_extra_mib": round((peak - rss_before) / 2**20),
            "size_mib": round(cost.totals["size_bytes"] / 2**20, 1), "avg_weight_bits": cost.totals["avg_weight_bits"],
            "samples": samples, "threads": torch.get_num_threads()}  # fmt: skip


def bench_threads() -> int:
    """Torch threads for accuracy rows: 2, or ``BITSMITH_BENCH_THREADS`` (1 when two benchmarks share 2 cores)."""
    return int(os.environ.get("BITSMITH_BENCH_THREADS", "2"))


def reference(name: str, scored: bool = True) -> tuple[torch.nn.Module, LanguageModelTask]:
    """The FP32 zoo LLM ``name`` and the task (text windows, calibration) with its FP32 reference made (unless
    ``scored`` is false: rows that only train)."""
    from bitsmith.zoo.llm import load_llm

    torch.set_num_threads(bench_threads())
    model, tokenizer = load_llm(name)
    task = language_model_task(tokenizer, EVAL_WINDOWS, CALIB_WINDOWS, CALIB_BATCH, seed=0, kl_windows=KL_WINDOWS)
    if scored:
        task.evaluate(model)  # makes the FP32 reference
    return model, task


Entry = tuple[str, dict[str, Any], dict[str, Any], Callable[[], dict[str, Any]]]


def fill(rows: Rows, entries: list[Entry], write: Callable[[list[dict[str, Any]]], None]) -> None:
    """Measure each ``(label, key, fields, measure)`` whose key has no row yet; a failure becomes an error row.
    The page is rewritten after every row and at the end."""
    for label, key, fields, measure_row in entries:
        if rows.done(**key):
            continue
        print(f"{label} ...", flush=True)
        try:
            row = measure_row()
        except (ValueError, RuntimeError) as exc:
            row = {"error": str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}
        rows.add({"name": label, **key, **row, **fields})
        print(f"  { ({k: v for k, v in rows.rows[-1].items() if k not in ('samples', 'methods')}) }", flush=True)
        write(rows.rows)
    write(rows.rows)


def run_rows(
    doc: str,
    path: Path,
    entries: Callable[[argparse.Namespace], list[Entry]],
    write: Callable[[list[dict[str, Any]]], None],
    parser: argparse.ArgumentParser | None = None,
) -> None:
    """A resumable benchmark's command line: ``--write-only`` rewrites the page from ``path``; otherwise the
    missing rows of ``entries(args)`` (those whose label contains ``--only``) are measured at the bench threads."""
    args = (parser or bench_parser(doc)).parse_args()
    if args.write_only:
        write(json.loads(path.read_text()))
        return
    torch.set_num_threads(bench_threads())
    fill(Rows(path), [e for e in entries(args) if args.only is None or args.only in e[0]], write)


def run() -> None:
    model, task = reference(MODEL)
    fp32_mib = round(sum(p.numel() * 4 for p in model.parameters()) / 2**20, 1)
    entries: list[Entry] = [
        (label, key, {"fp32_mib": fp32_mib, "methods": methods}, functools.partial(measure, model, task, methods))
        for label, methods, key in configurations()
    ]
    fill(Rows(ROWS), entries, write)


def write(rows: list[dict[str, Any]]) -> None:
    fp32 = next((r for r in rows if r["method"] == "fp32"), None)
    lines = [
        "# LLM weight quantization: SmolLM2-135M-Instruct",
        "",
        "Regenerate: `make bench-llm` (`python benchmarks/llm.py`; rows resume; `--write-only` rewrites this page).",
        f"Perplexity on the first {EVAL_WINDOWS} windows of 512 tokens ({EVAL_WINDOWS * 511:,} scored tokens per text) "
        f"of *Persuasion* and of the Python 3.11 library docs; KL (nats per token) and top-1 agreement with FP32 on "
        f"the first {KL_WINDOWS} Persuasion windows. Calibration: {CALIB_WINDOWS} random 512-token windows of *Emma* "
        "and *Mansfield Park*, seed 0. Only the Linear layers of the 30 decoder blocks are quantized; the tied "
        "embedding / `lm_head` stays FP32 in every row. Size: packed weights plus scales and zero points "
        "(`model_cost`); avg w bits averages over every weight layer, the FP32 embedding included. Peak memory: the calibration's growth of the process's resident memory over what it held "
        "before (the FP32 model and its reference copy); all rows share one long process, so a row measured after "
        "a larger one reuses memory the allocator kept and can show little or no growth (0): the time and memory "
        "target is measured alone in a fresh process, [llm_alone.md](llm_alone.md).",
        "",
        "The reference is de-quantized from a Q4_1 GGUF file (4 bits, blocks of 32, asymmetric), so its weights "
        "already lie on a 4-bit g32 grid: the 'GGUF structure' row must reproduce FP32 (it checks the loader), "
        "and 4-bit g32 rows are easier than they would be on an original FP16 checkpoint.",
        "",
        "SmolLM2's hidden size (576) is not a multiple of 128: group 128 is refused for it, and the tables use "
        "groups of 64 and 32 where the issue names 128 and 64.",
        "",
        "Peers (`benchmarks/llm_peers.py`, same model, windows and calibration): llm-compressor `0.14.0.1` GPTQ "
        "(asymmetric, static act-order, dampening `0.01`, blocks of `128`, as bitsmith's) runs in its own venv "
        "(`.venv-peers`, it pins transformers `<=5.17`); its compressed-tensors output is decompressed with the "
        "compressed-tensors library and scored here. torchao `0.18` builds int4 weights only for CUDA kernels "
        "(no CPU layout), so its rows apply torchao's own int4 quantizer functions (tinygemm parameters, or HQQ) "
        "on CPU to the bfloat16 weights and score the de-quantized weights in FP32: torchao's quality, not its "
        "speed. Peer sizes are bitsmith's packing of the same bits and groups. GPTQModel `7.7.0` needs torch "
        "`>=2.14.1`; this machine's CPU build is `2.13.0`, so it is not run.",
        "",
        "| row | ppl Persuasion | ppl Python docs | KL to FP32 | top-1 agree % | size MiB | avg w bits | quant s | "
        "calib peak +MiB | threads | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | | | | | |")
            continue
        load = "/".join(f"{x:.1f}" for x in r.get("load", [])[:1])
        lines.append(
            f"| {r['name']} | {r['perplexity']:.2f} | {r['perplexity_docs']:.2f} | {r['kl']:.4f} | "
            f"{100 * r['top1_agreement']:.1f} | {r['size_mib']:.1f} | {r['avg_weight_bits']:.2f} | "
            f"{r['quant_seconds']:.1f} | {r['calib_extra_mib']} | {r['threads']} | {load} |"
        )
    if fp32:
        lines += ["", "## Greedy generations (24 tokens)", ""]
        shown = [r for r in rows if "samples" in r and r["method"] in ("fp32", "rtn", "gptq", "awq") and
                 (r["method"] == "fp32" or (r["bits"], r["group"]) == (3, 64))]  # fmt: skip
        for index, sample in enumerate(fp32["samples"]):
            lines += [f"Prompt: *{sample['prompt']}*", "", "| row | continuation |", "|---|---|"]
            for r in shown:
                text = r["samples"][index]["compressed"]
                lines.append(f"| {r['name']} | {' '.join(text.split()).replace('|', '/')} |")
            lines.append("")
    lines += ["![perplexity vs bits](llm.png)", ""]
    (RESULTS / "llm.md").write_text("\n".join(lines))
    plot(rows)


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in zip(axes, ("perplexity", "perplexity_docs"), ("Persuasion", "Python docs"), strict=True):
        for method, marker in (("rtn", "o"), ("gptq", "s"), ("awq", "^"), ("mixed-gptq", "D"),
                               ("llmcompressor-gptq", "x"), ("torchao-int4", "+"), ("torchao-int4-hqq", "*")):  # fmt: skip
            points = sorted((r["avg_weight_bits"], r[key]) for r in rows if r["method"] == method and key in r)
            if points:
                ax.plot(*zip(*points, strict=True), marker, label=method.upper(), alpha=0.8)
        for r in rows:
            if r["method"] == "fp32" and key in r:
                ax.axhline(r[key], color="gray", ls="--", label="FP32")
        ax.set_xlabel("average bits per quantized weight (incl. scales)")
        ax.set_ylabel(f"perplexity, {title} (log)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: perplexity vs bits per weight")
    save_figure(fig, "llm.png")


if __name__ == "__main__":
    if "--write-only" in sys.argv:
        import json

        write(json.loads(ROWS.read_text()))
    else:
        run()
