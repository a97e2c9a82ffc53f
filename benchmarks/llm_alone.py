"""The timing target's row, alone on the machine in a fresh process: GPTQ W4 g64 of SmolLM2 (32 calibration
windows of 512 tokens, as in ``benchmarks/llm.py``), quantization seconds including calibration, and the
process's peak resident memory during it, against the FP32 model's size. Run nothing else meanwhile (the
load average is recorded). Writes docs/results/llm_alone.{json,md}.

In ``benchmarks/llm.py`` every row runs in one long process, so a row measured after a larger one reuses
memory the allocator kept and can show little or no growth; this fresh process has no such history.
"""

from __future__ import annotations

import json
import time
import warnings

import torch
from common import RESULTS
from llm import BLOCKS, CALIB_BATCH, CALIB_WINDOWS, MODEL

from bitsmith.eval.latency import load_averages
from bitsmith.eval.lm import language_model_task
from bitsmith.files import atomic_write_text
from bitsmith.method import build_method, compress
from bitsmith.sequential import peak_rss, reset_peak_rss

ROWS = RESULTS / "llm_alone.json"


def run() -> None:
    from bitsmith.zoo.llm import load_llm

    torch.set_num_threads(2)
    model, tokenizer = load_llm(MODEL)
    task = language_model_task(tokenizer, 1, CALIB_WINDOWS, CALIB_BATCH, seed=0)
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    load_before = load_averages()
    reset_peak_rss()
    before = peak_rss()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress(
            model, [build_method({"name": "gptq", "bits": 4, "group_size": 64, "where": BLOCKS})], task.calibration
        )
    seconds = time.perf_counter() - start
    peak = peak_rss()
    row = {"name": "GPTQ W4 g64, SmolLM2, 32 x 512-token windows", "quant_seconds": round(seconds, 1),
           "rss_before_mib": round(before / 2**20), "peak_rss_mib": round(peak / 2**20),
           "calib_extra_mib": round((peak - before) / 2**20), "fp32_model_mib": round(fp32_bytes / 2**20),
           "threads": 2, "load_before": load_before, "load_after": load_averages()}  # fmt: skip
    print(row, flush=True)
    atomic_write_text(ROWS, json.dumps([row], indent=1))
    r = row
    lines = [
        "# GPTQ time and memory, alone: SmolLM2-135M-Instruct",
        "",
        "Regenerate: `python benchmarks/llm_alone.py` (alone on the machine, a fresh process).",
        "",
        "| row | quant s (incl. calibration) | RSS before MiB | peak RSS MiB | calibration extra MiB | FP32 model MiB | "
        "extra / FP32 | threads | load before | load after |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['name']} | {r['quant_seconds']:.1f} | {r['rss_before_mib']} | {r['peak_rss_mib']} | "
        f"{r['calib_extra_mib']} | {r['fp32_model_mib']} | {r['calib_extra_mib'] / r['fp32_model_mib']:.2f} | "
        f"{r['threads']} | {r['load_before'][0]:.2f} | {r['load_after'][0]:.2f} |",
        "",
    ]
    (RESULTS / "llm_alone.md").write_text("\n".join(lines))


if __name__ == "__main__":
    run()
