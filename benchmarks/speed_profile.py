"""Where the deployed int8 models spend their time: bitsmith's torchao PT2E path vs the peer's own flow.

The same latency inputs as ``speed.py`` (MiniLM 32 x 128 tokens, CNN / ViT 256 images, 2 threads).
Each compiled model runs ``RUNS`` times under ``torch.profiler``; the self CPU time per forward is
grouped into int8 GEMMs / convolutions (oneDNN ``qlinear`` / ``qconv``), float attention
(``scaled_dot_product_attention``), Inductor's generated kernels (norms, GELU, softmax-free glue,
quantize / dequantize, SmoothQuant divisions: the compiled graph's own time) and the rest. FP32
eager runs alongside for the total it is compared with.

Regenerate: ``python benchmarks/speed_profile.py [minilm cnn vit]``. Writes ``docs/results/speed-profile.md``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from common import RESULTS, load
from speed import BATCH, THREADS, bitsmith_model, latency_example, torchao_pt2e
from torch.profiler import ProfilerActivity, profile

from bitsmith.export.pt2e import CompiledModel
from bitsmith.files import atomic_write_text

RUNS = 5
GROUPS = {"int8 GEMM / conv": ("onednn::q",), "float GEMM / conv": ("aten::addmm", "aten::mm", "aten::bmm",
          "mkldnn_convolution"), "float attention": ("scaled_dot_product",),
          "compiled kernels": ("## Call CompiledFxGraph",)}  # fmt: skip


def call(model: Any, example: Any) -> Any:
    with torch.no_grad():
        return model(**example) if isinstance(example, dict) else model(example)


def breakdown(model: Any, example: Any) -> dict[str, float]:
    """Self CPU milliseconds per forward, by group, and the total."""
    for _ in range(2):
        call(model, example)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(RUNS):
            call(model, example)
    out = dict.fromkeys([*GROUPS, "other"], 0.0)
    for event in prof.key_averages():
        group = next((g for g, keys in GROUPS.items() if any(k in event.key for k in keys)), "other")
        out[group] += event.self_cpu_time_total / 1000 / RUNS
    out["total"] = sum(out.values())
    return out


def run(models: list[str]) -> list[str]:
    torch.set_num_threads(THREADS)
    lines = []
    for name in models:
        base, task = load(name)
        example = latency_example(name, task)
        paths = {
            "FP32 torch eager": base,
            "bitsmith W8A8 -> torchao PT2E": CompiledModel.from_model(bitsmith_model(name, base, task), example),
            "torchao PT2E X86Inductor (static)": torchao_pt2e(base, task, name, example),
        }
        for label, model in paths.items():
            row = breakdown(model, example)
            cells = " | ".join(f"{row[g]:.1f}" for g in [*GROUPS, "other", "total"])
            lines.append(f"| {name} | {label} | {cells} |")
            print(lines[-1], flush=True)
    return lines


def write(lines: list[str]) -> None:
    header = [
        "# Where the int8 time goes (self CPU ms per forward, 2 threads)",
        "",
        f"Profiled with `torch.profiler` over {RUNS} forwards after 2 warm-up runs; inputs as in",
        f"[speed.md](speed.md) (MiniLM {BATCH['minilm']} x 128 tokens, CNN / ViT {BATCH['cnn']} images).",
        "*compiled kernels*: the time Inductor's generated code spends itself (norms, GELU, softmax glue,",
        "quantize / dequantize, SmoothQuant divisions); *other*: every other op's own time (eager norms,",
        "GELU, adds, layout copies).",
        "Regenerate: `python benchmarks/speed_profile.py`.",
        "",
        "| model | path | " + " | ".join([*GROUPS, "other", "total"]) + " |",
        "|---|---|" + "---|" * (len(GROUPS) + 2),
    ]
    atomic_write_text(RESULTS / "speed-profile.md", "\n".join([*header, *lines, ""]))


if __name__ == "__main__":
    write(run(sys.argv[1:] or list(BATCH)))
