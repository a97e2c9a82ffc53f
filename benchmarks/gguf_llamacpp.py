"""GGUF files run inside llama.cpp (SmolLM2-135M): bitsmith's RTN / GPTQ / AWQ written on llama.cpp's own grids
against llama.cpp's own quantizations of the same FP32 model (its quantize tool, Q4_K_M also with an importance
matrix on the same calibration windows), every row scored by llama.cpp on the same text windows as PyTorch.

Quality rows (perplexity on Persuasion and the Python docs, KL and top-1 agreement with the PyTorch FP32 model)
run on ``BITSMITH_BENCH_THREADS`` threads and may share the machine; ``--time`` measures prefill (512 tokens) and
greedy decode (128 new tokens, batch 1) tokens/s on 2 threads, to run alone on an idle machine, and the memory
bandwidth (a 1 GiB copy) for the fraction of the bandwidth limit. bitsmith's files keep the embedding as llama.cpp's
Q4_0 / Q4_1 files do (Q8_0, rounded by llama.cpp's own rule), so the rows differ only in the block layers.

Writes docs/results/gguf.{json,md,png}; rows resume; ``--write-only`` rewrites the page; ``--only TEXT`` measures
the rows whose label contains TEXT. Needs ``make install-llamacpp``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import RESULTS, Rows, bench_parser, peer_run, save_figure
from llm import BLOCKS, CALIB_BATCH, CALIB_WINDOWS, bench_threads, compress_quietly
from llm_speed import timed

from bitsmith.deploy import int8_pairs_saturate
from bitsmith.eval.lm import LanguageModelTask, language_model_task
from bitsmith.export.gguf_file import write_gguf
from bitsmith.export.llamacpp import GgufLanguageModel, importance_matrix, quantize, speed
from bitsmith.zoo import cache_dir
from bitsmith.zoo.llm import gguf_path, load_llm

ROWS = RESULTS / "gguf.json"
WORK = cache_dir() / "bench" / "gguf"  # the GGUF files, kept for the timed pass
EVAL_WINDOWS = 20  # per text: fewer than llm.md's 80 (llama.cpp at 1 thread scores ~4 s a window); stated
KL_WINDOWS = 8
DOCS_SHARE_PCT = 50  # the calibration mix row: this share of the windows from the Python docs (after the scored text)
LLAMACPP_TYPES = ("F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M")
AUTOROUND_ITERS = (0, 200)  # 0: its optimised round-to-nearest ("RTN mode"); 200: SignRound, its default
AUTOROUND_PY = Path(".venv-autoround/bin/python")
BITSMITH = [(method, grid) for grid in ("q4_0", "q4_1") for method in ("rtn", "gptq", "awq")] + [("gptq", "q8_0")]


def rows_to_measure() -> list[tuple[str, dict[str, Any]]]:
    out = [("PyTorch FP32 (eager)", {"source": "pytorch", "type": "F32"}),
           ("PyTorch RTN W4 g64 on the int4 CPU kernel (bf16 activations, eager)", {"source": "pytorch", "type": "INT4"}),
           ("llama.cpp F32 (written by bitsmith)", {"source": "llama.cpp", "type": "F32"})]  # fmt: skip
    out += [(f"llama.cpp {t}", {"source": "llama.cpp", "type": t}) for t in LLAMACPP_TYPES]
    out.append(("llama.cpp Q4_K_M + imatrix", {"source": "llama.cpp", "type": "Q4_K_M-imatrix"}))
    out += [(f"AutoRound gguf:q4_k_m, {iters} iterations" + (" (its optimised RTN)" if iters == 0 else ""),
             {"source": "autoround", "method": f"iters{iters}", "type": "Q4_K_M"}) for iters in AUTOROUND_ITERS]  # fmt: skip
    out += [(f"bitsmith {m.upper()} on {g.upper()}", {"source": "bitsmith", "method": m, "type": g.upper()})
            for m, g in BITSMITH]  # fmt: skip
    out.append(("bitsmith mixed Q4_0 / Q5_0 / Q8_0 + GPTQ, at Q4_K_M's block size",
                {"source": "bitsmith", "method": "mixed-gptq", "type": "MIXED"}))  # fmt: skip
    for method in ("gptq", "rtn", "awq"):
        out.append((f"bitsmith {method.upper()} on llama.cpp's Q4_K_M type of each tensor",
                    {"source": "bitsmith", "method": f"{method}-types", "type": "Q4_K_M"}))  # fmt: skip
    out.append((f"bitsmith GPTQ on llama.cpp's Q4_K_M type of each tensor, calibration {100 - DOCS_SHARE_PCT} % "
                f"Austen + {DOCS_SHARE_PCT} % Python docs", {"source": "bitsmith", "method": "gptq-types-mix",
                "type": "Q4_K_M"}))  # fmt: skip
    out.append((f"bitsmith GPTQ on Q4_0, calibration {100 - DOCS_SHARE_PCT} % Austen + {DOCS_SHARE_PCT} % Python docs",
                {"source": "bitsmith", "method": "gptq-mix", "type": "Q4_0"}))  # fmt: skip
    return out


def types_of(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    """``where`` selecting the decoder blocks with, per Linear, the grid of its tensor's type in the GGUF ``path``
    (e.g. llama.cpp's Q4_K_M mix: Q5_0 / Q4_K / Q6_K / Q8_0 on SmolLM2)."""
    import gguf

    stored = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(path)).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    overrides = {}
    for name, module in model.named_modules():
        if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
            overrides[name] = {"grid": stored[names.get_name(name + ".weight", try_suffixes=(".weight",))]}
    return {**BLOCKS, "overrides": overrides}


def block_bits(path: Path) -> float:
    """Bits per weight of the decoder blocks' matrices in a GGUF file (scales included)."""
    import gguf

    blocks = [t for t in gguf.GGUFReader(str(path)).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return sum(int(t.n_bytes) for t in blocks) * 8 / sum(int(t.n_elements) for t in blocks)


def mixed_methods(budget_file: Path) -> list[dict[str, Any]]:
    """``mixed`` picks 4, 5 or 8 bits (symmetric groups of 32: Q4_0 / Q5_0 / Q8_0, 0.5 bits of fp16 scale each)
    per Linear from Fisher sensitivities, at the block bits of ``budget_file``; GPTQ then quantizes each layer."""
    return [{"name": "mixed", "sensitivity": "fisher", "sensitivity_batches": 1, "candidates": [4, 5, 8],
             "avg_bits": round(block_bits(budget_file) - 0.5, 3), "a_bits": None, "w_granularity": "group",
             "w_group_size": 32, "w_symmetric": True, "where": BLOCKS},
            {"name": "gptq", "where": BLOCKS}]  # fmt: skip


def autoround_gguf(task: LanguageModelTask, iters: int, out: Path) -> float:
    """AutoRound's GGUF export (``gguf:q4_k_m``) in its own venv on the task's calibration windows: the file is
    moved to ``out``; returns AutoRound's seconds."""
    import shutil

    from bitsmith.zoo.llm import llm_dir

    script = "benchmarks/peers/autoround_gguf.py"
    with peer_run(AUTOROUND_PY, script, llm_dir("smollm2"), task, "gguf:q4_k_m", str(iters), str(bench_threads())) as (
        folder,
        timing,
    ):
        shutil.move(next(folder.rglob("*.gguf")), out)
        return float(timing["seconds"])


def pytorch_int4(model: torch.nn.Module) -> torch.nn.Module:
    """bitsmith's RTN W4 g64 on the decoder blocks, deployed on PyTorch's packed int4 CPU kernel (the reference row
    of what runs in Python; ``docs/results/llm_speed.md`` has its other variants)."""
    from bitsmith import build_method, compress
    from bitsmith.export.int4_cpu import deploy_int4

    quantized = copy.deepcopy(model)
    compress(quantized, [build_method({"name": "rtn", "bits": 4, "group_size": 64, "where": BLOCKS})], [])
    return deploy_int4(quantized)[0].eval()


def file_of(key: dict[str, Any]) -> Path:
    return WORK / f"{key['source']}-{key.get('method', '')}-{key['type']}.gguf".replace("--", "-")


class Bench:
    def __init__(self) -> None:
        torch.set_num_threads(bench_threads())
        WORK.mkdir(parents=True, exist_ok=True)
        self.model, tokenizer = load_llm("smollm2")
        self.task: LanguageModelTask = language_model_task(tokenizer, EVAL_WINDOWS, CALIB_WINDOWS, CALIB_BATCH,
                                                           seed=0, kl_windows=KL_WINDOWS)  # fmt: skip
        self.fp32_metrics = self.task.evaluate(self.model)  # also makes the FP32 reference
        self.f32 = file_of({"source": "llama.cpp", "type": "F32"})  # every other file starts from it
        if not self.f32.is_file():
            write_gguf(self.model, gguf_path("smollm2"), self.f32)

    def scored(self, path: Path) -> dict[str, Any]:
        lm = GgufLanguageModel(path, threads=bench_threads())
        try:
            metrics = self.task.evaluate(lm)
        finally:
            lm.close()
        return {**metrics, "file_mib": round(path.stat().st_size / 2**20, 2),
                "bits_per_weight": round(path.stat().st_size * 8 / self.parameters(), 3)}  # fmt: skip

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())  # tied LM head counted once

    def calibration_text(self) -> Path:
        """The calibration windows as text, for llama.cpp's imatrix tool (it tokenizes them again)."""
        path = WORK / "calibration.txt"
        if not path.is_file():
            windows = torch.cat([b["input_ids"] for b in self.task.calibration])
            path.write_text("\n".join(self.task.tokenizer.decode(w, skip_special_tokens=True) for w in windows))
        return path

    def measure(self, key: dict[str, Any]) -> dict[str, Any]:
        if key["source"] == "pytorch" and key["type"] == "INT4":
            began = time.perf_counter()
            fast = pytorch_int4(self.model)
            seconds = time.perf_counter() - began
            return {**self.task.evaluate(fast), "quant_seconds": round(seconds, 1)}
        if key["source"] == "pytorch":
            return {**self.fp32_metrics, "quant_seconds": 0.0}
        path = file_of(key)
        began = time.perf_counter()
        if key["source"] == "llama.cpp" and key["type"] != "F32":
            imatrix = None
            if key["type"].endswith("imatrix"):
                imatrix = WORK / "imatrix.gguf"
                importance_matrix(self.f32, self.calibration_text(), imatrix, CALIB_WINDOWS, threads=bench_threads())
            quantize(self.f32, path, key["type"].split("-")[0], imatrix, threads=bench_threads())
        elif key["source"] == "autoround":
            seconds = autoround_gguf(self.task, int(key["method"].removeprefix("iters")), path)
            return {**self.scored(path), "quant_seconds": round(seconds, 1)}
        elif key["source"] == "bitsmith":
            quantized, calibration = copy.deepcopy(self.model), self.task
            method, *options = key["method"].split("-")  # e.g. "awq-types", "gptq-types-mix", "mixed-gptq"
            if "mix" in options:
                calibration = language_model_task(self.task.tokenizer, EVAL_WINDOWS, CALIB_WINDOWS, CALIB_BATCH,
                                                  seed=0, docs_share=DOCS_SHARE_PCT / 100)  # fmt: skip
            if method == "mixed":
                methods = mixed_methods(file_of({"source": "llama.cpp", "type": "Q4_K_M"}))
            elif "types" in options:
                where = types_of(self.model, file_of({"source": "llama.cpp", "type": "Q4_K_M"}))
                methods = [{"name": method, "grid": "q5_0", "where": where}]
            else:
                methods = [{"name": method, "grid": key["type"].lower(), "where": BLOCKS}]
            compress_quietly(quantized, methods, calibration)
            write_gguf(quantized, gguf_path("smollm2"), path, float_type="q8_0")
            del quantized
        seconds = time.perf_counter() - began if key["type"] != "F32" else 0.0
        return {**self.scored(path), "quant_seconds": round(seconds, 1)}


def bandwidth_gb_s() -> float:
    """Memory bandwidth: the best of 5 copies of 1 GiB (read + write bytes per second)."""
    source, target = np.ones(2**27), np.empty(2**27)
    best = min(_timed(lambda: np.copyto(target, source)) for _ in range(5))
    return 2 * source.nbytes / best / 1e9


def _timed(action: Any) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def time_rows(rows: Rows, only: str | None) -> None:
    """Prefill / decode tokens/s of every measured GGUF file on 2 threads (run alone), and the bandwidth."""
    from bitsmith.eval.latency import load_averages

    torch.set_num_threads(2)
    model, tokenizer = load_llm("smollm2")
    task = language_model_task(tokenizer, 2, 1, 1, seed=0)
    prompt = task.eval_rows["perplexity"][0].tolist()
    bandwidth = bandwidth_gb_s()
    machine = {"cpu": torch.backends.cpu.get_cpu_capability(), "vnni": not int8_pairs_saturate(),
               "bandwidth_gb_s": round(bandwidth, 1), "load_before": load_averages()}  # fmt: skip
    for row in list(rows.rows):
        if "error" in row or (only and only not in row["name"]) or row["source"] in ("build", "paired"):
            continue
        if row["source"] == "pytorch":  # transformers' eager generate with its KV cache (benchmarks/llm_speed.py)
            ids = torch.tensor([prompt])
            timed_model = pytorch_int4(model) if row["type"] == "INT4" else model.eval()
            eager = timed(timed_model, ids, ids[:, :17])
            measured = {"prefill_tokens_per_s": eager["prefill_tok_s"], "decode_tokens_per_s": eager["decode_tok_s"]}
            rows.put({**row, **measured, **machine}, source="pytorch", type=row["type"])
            print(row["name"], {k: round(v, 1) for k, v in measured.items()}, flush=True)
            continue
        key = {k: row[k] for k in ("source", "method", "type") if k in row}
        path = file_of(key)
        if not path.is_file():
            continue
        measured = speed(path, prompt, threads=2)
        bytes_per_token = path.stat().st_size  # every weight is read once per token (the tied embedding too)
        limit = bandwidth * 1e9 / bytes_per_token
        rows.put({**row, **measured, **machine, "bandwidth_fraction": measured["decode_tokens_per_s"] / limit},
                 **key)  # fmt: skip
        print(row["name"], {k: round(v, 1) for k, v in measured.items()}, flush=True)


PAIRED_ROUNDS = 20


def time_pairs(rows: Rows, only: str | None) -> None:
    """Decode tokens/s of each bitsmith file against llama.cpp's own file of the same type, timed in alternation
    (``paired_speed``, ABBA order) on 2 threads, alone: the ratio is what the 5 % target is stated on, as a VM's
    drift between two separately timed rows can exceed it."""
    from bitsmith.eval.latency import load_averages
    from bitsmith.export.llamacpp import paired_speed

    _, tokenizer = load_llm("smollm2")
    prompt = language_model_task(tokenizer, 2, 1, 1, seed=0).eval_rows["perplexity"][0].tolist()
    for row in list(rows.rows):
        if row["source"] != "bitsmith" or "error" in row or (only and only not in row["name"]):
            continue
        key = {k: row[k] for k in ("source", "method", "type")}
        peer = file_of({"source": "llama.cpp", "type": row["type"]})
        if not (file_of(key).is_file() and peer.is_file()):
            continue
        load = load_averages()
        measured = paired_speed(file_of(key), peer, prompt, rounds=PAIRED_ROUNDS, threads=2)
        rows.put({"name": f"paired: {row['name']} / llama.cpp {row['type']}", "source": "paired",
                  "method": row["method"], "type": row["type"], **measured, "load_before": load,
                  "cpu": torch.backends.cpu.get_cpu_capability(), "vnni": not int8_pairs_saturate()},
                 source="paired", method=row["method"], type=row["type"])  # fmt: skip
        print(row["name"], {k: round(v, 3) for k, v in measured.items()}, flush=True)


def time_build(rows: Rows) -> None:
    """The one-time llama.cpp build as `make install-llamacpp` runs it, into a fresh folder (run alone): wall and
    CPU seconds (the compiler processes), so the 2-core idle time can be told from a loaded one."""
    import os
    import re
    import resource
    import subprocess
    import sys
    import tempfile

    from bitsmith.eval.latency import load_averages
    from bitsmith.export.llamacpp import VERSION

    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    cmake_args = re.search(r'CMAKE_ARGS="([^"]*)"', makefile.replace("\\\n", " ").replace("\t", " "))
    before, load = resource.getrusage(resource.RUSAGE_CHILDREN), load_averages()
    with tempfile.TemporaryDirectory() as build:
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", "--no-cache-dir",
                        "--no-binary", "llama-cpp-python", "-C", f"build-dir={build}", f"llama-cpp-python=={VERSION}"],
                       check=True, env={**os.environ, "CMAKE_ARGS": " ".join(cmake_args.group(1).split()) if cmake_args
                                        else "", "CMAKE_BUILD_PARALLEL_LEVEL": "2"})  # fmt: skip
        wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    rows.put({"name": "llama.cpp build (make install-llamacpp)", "source": "build", "type": "build",
              "build_wall_s": round(wall, 1), "build_cpu_s": round(cpu, 1), "load_before": load,
              "load": load_averages()}, source="build")  # fmt: skip


def write_page(rows: list[dict[str, Any]]) -> None:
    fp32 = next((r for r in rows if r["source"] == "pytorch" and r["type"] == "F32"), None)
    timed = [r for r in rows if "bandwidth_gb_s" in r]
    lines = [
        "# GGUF files inside llama.cpp",
        "",
        "Regenerate: `make bench-gguf` (`python benchmarks/gguf_llamacpp.py`, then `--time` alone on an idle machine; rows "
        "resume; `--write-only` rewrites this page). SmolLM2-135M; every GGUF row is scored by llama.cpp "
        "(llama-cpp-python 0.3.36) on the same token windows as the PyTorch row: perplexity on the first "
        f"{EVAL_WINDOWS} windows of 512 tokens of *Persuasion* and of the Python docs, KL(FP32 || file) and top-1 "
        f"agreement with the PyTorch FP32 model on the first {KL_WINDOWS}. Calibration (bitsmith's GPTQ / AWQ, "
        f"llama.cpp's imatrix): {CALIB_WINDOWS} random windows of *Emma* and *Mansfield Park*. bitsmith's rows "
        "quantize the 30 decoder blocks' Linears on the named grid (`grid:`) and write the embedding as Q8_0 as "
        "llama.cpp's own Q4_0 / Q4_1 files do. Increase: perplexity minus the llama.cpp F32 row's.",
        "",
        "Read the Q4_1 rows with care: SmolLM2's float weights are de-quantized from the Q4_1 GGUF it ships as, so "
        "every block's minimum and maximum are already Q4_1 grid points and any Q4_1 re-quantization (llama.cpp's "
        "or bitsmith's round-to-nearest, GPTQ's and AWQ's too: their error is zero on weights already on the grid, "
        "AWQ's search keeps scale 1) recovers them almost exactly. Q4_0 (a symmetric grid) and the K-quant mix "
        "are the informative rows. SmolLM2's widths (576) are not multiples of 256, so llama.cpp's Q4_K_M gives "
        "most of its tensors its fallback type Q5_0 (only `ffn_down`, 1,536 wide, gets Q4_K / Q6_K).",
        "",
        "AutoRound (PyPI `auto-round` 0.16.1, in its own venv `.venv-autoround`) writes `gguf:q4_k_m` itself, with "
        "the same type per tensor as llama.cpp's Q4_K_M on SmolLM2, calibrated on the same windows: 0 iterations is "
        "its optimised round-to-nearest (`enable_opt_rtn`), the mode AutoRound's README recommends for GGUF at every "
        "width but 3 bits; 200 is its SignRound default (about 2.4 CPU-minutes per decoder block on 1 thread here).",
        "",
        "| row | ppl Persuasion | increase | ppl docs | increase | KL | top-1 % | file MiB | bits/weight | "
        "quantize s | prefill tok/s | decode tok/s | of bandwidth limit | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = next((r for r in rows if r["source"] == "llama.cpp" and r["type"] == "F32" and "error" not in r), fp32)
    builds = [r for r in rows if r["source"] == "build"]
    pairs = [r for r in rows if r["source"] == "paired"]
    rows = [r for r in rows if r["source"] not in ("build", "paired")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |" + " |" * 12)
            continue
        up = f"{r['perplexity'] - base['perplexity']:+.2f}" if base else ""
        up_docs = f"{r['perplexity_docs'] - base['perplexity_docs']:+.2f}" if base else ""
        fraction = f"{100 * r['bandwidth_fraction']:.0f} %" if "bandwidth_fraction" in r else ""
        speed_cells = (f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | {fraction}"
                       if "decode_tokens_per_s" in r else "| |")  # fmt: skip
        lines.append(f"| {r['name']} | {r['perplexity']:.2f} | {up} | {r['perplexity_docs']:.2f} | {up_docs} | "
                     f"{r.get('kl', 0):.4f} | {100 * r.get('top1_agreement', 1):.1f} | {r.get('file_mib', '')} | "
                     f"{r.get('bits_per_weight', '')} | {r['quant_seconds']} | {speed_cells} | "
                     f"{r.get('load', [0])[0]:.1f} |")  # fmt: skip
    if timed:
        t = timed[0]
        lines += ["", f"Timed on 2 threads, {t['cpu']}{' with VNNI' if t['vnni'] else ''}; memory bandwidth "
                  f"{t['bandwidth_gb_s']} GB/s (1 GiB copy); load before timing {t['load_before']}. The bandwidth "
                  "limit of decode is bandwidth / file bytes (every weight read once per token)."]  # fmt: skip
    if pairs:
        lines += ["", f"Decode speed against llama.cpp's own file of the same type, timed in alternation (`--time-pairs`: "
                  f"both files loaded, {PAIRED_ROUNDS} rounds of 128 greedy tokens each in ABBA order, 2 threads, alone): "
                  "the ratio is the median over rounds of bitsmith's tokens/s over llama.cpp's.", "",
                  "| pair | bitsmith decode tok/s | llama.cpp decode tok/s | ratio (median) | ratio min / max | CPU | "
                  "load before |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in pairs:
            lines.append(f"| {r['name'].removeprefix('paired: ')} | {r['first_decode_tokens_per_s']:.1f} | "
                         f"{r['second_decode_tokens_per_s']:.1f} | {r['decode_ratio']:.3f} | "
                         f"{r['decode_ratio_min']:.3f} / {r['decode_ratio_max']:.3f} | {r['cpu']}"
                         f"{' VNNI' if r['vnni'] else ''} | {r['load_before'][0]:.2f} |")  # fmt: skip
    for b in builds:
        lines += ["", "| one-time build | wall s | CPU s (compilers) | load before | load after |", "|---|---|---|---|---|",
                  f"| {b['name']} | {b['build_wall_s']} | {b['build_cpu_s']} | {b['load_before']} | {b['load']} |"]  # fmt: skip
    lines += ["", "![perplexity and decode speed vs file size](gguf.png)", ""]
    (RESULTS / "gguf.md").write_text("\n".join(lines))
    plot(rows)


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, speed_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    for source, marker in (("llama.cpp", "s"), ("autoround", "^"), ("bitsmith", "o")):
        chosen = [r for r in rows if r["source"] == source and "error" not in r and "file_mib" in r]
        ax.scatter([r["file_mib"] for r in chosen], [r["perplexity"] for r in chosen], marker=marker, label=source)
        for r in chosen:
            ax.annotate(r["name"].replace(f"{source} ", ""), (r["file_mib"], r["perplexity"]), fontsize=6)
        timed = [r for r in chosen if "decode_tokens_per_s" in r]
        speed_ax.scatter([r["file_mib"] for r in timed], [r["decode_tokens_per_s"] for r in timed], marker=marker,
                         label=source)  # fmt: skip
    ax.set(xlabel="file MiB", ylabel="perplexity, Persuasion (llama.cpp)", title="SmolLM2-135M GGUF files in llama.cpp")
    speed_ax.set(xlabel="file MiB", ylabel="decode tokens/s (2 threads, one pass)", title="decode speed vs file size")
    ax.legend()
    speed_ax.legend()
    save_figure(fig, "gguf.png")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--time", action="store_true", help="time the measured files (alone, 2 threads)")
    parser.add_argument("--time-pairs", action="store_true", help="time bitsmith's files against llama.cpp's (alone)")
    parser.add_argument("--time-build", action="store_true", help="time llama.cpp's build into a fresh folder (alone)")
    args = parser.parse_args()
    rows = Rows(ROWS)
    if args.time_build:
        time_build(rows)
    elif args.time_pairs:
        time_pairs(rows, args.only)
    elif args.time:
        time_rows(rows, args.only)
    elif not args.write_only:
        bench = None
        for label, key in rows_to_measure():
            if (args.only and args.only not in label) or rows.done(**key):
                continue
            print(f"{label} ...", flush=True)
            bench = bench or Bench()
            try:
                row = bench.measure(key)
            except (ValueError, RuntimeError, FileNotFoundError) as exc:
                row = {"error": str(exc).splitlines()[0][:200]}
            rows.add({"name": label, **key, **row, "threads": bench_threads()})
            print(
                f"  { {k: v for k, v in rows.rows[-1].items() if k in ('perplexity', 'kl', 'file_mib')} }", flush=True
            )
            write_page(rows.rows)
    write_page(rows.rows)


if __name__ == "__main__":
    main()
