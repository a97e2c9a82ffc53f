"""Where the deployed int8 models spend their time: bitsmith's torchao PT2E path vs the peer's own flow.

The same latency inputs as ``speed.py`` (MiniLM 32 x 128 tokens, CNN / ViT 256 images, 2 threads).
Each compiled model runs ``RUNS`` times under ``torch.profiler``; the self CPU time per forward is
grouped into int8 GEMMs / convolutions (oneDNN ``qlinear`` / ``qconv``), float attention
(``scaled_dot_product_attention``), Inductor's generated kernels (norms, GELU, softmax-free glue,
quantize / dequantize, SmoothQuant divisions: the compiled graph's own time) and the rest. FP32
eager runs alongside for the total it is compared with.

The ONNX Runtime paths (bitsmith's QDQ file vs ONNX Runtime's own static quantization, and the FP32 file) are
profiled with ONNX Runtime's profiler, each node's kernel time grouped by operator: integer kernels, float
GEMMs / convolutions (attention's two matmuls among them), softmax, quantize / dequantize and layout
conversions (``Transpose``, ``ReorderInput`` / ``ReorderOutput``), the rest.

Regenerate: ``python benchmarks/speed_profile.py [minilm cnn vit]``. Writes ``docs/results/speed-profile.md``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, load
from speed import BATCH, SCRATCH, THREADS, bitsmith_model, latency_example, ort_static, torchao_pt2e
from torch.profiler import ProfilerActivity, profile

from bitsmith.export.onnx import export_onnx
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


ORT_GROUPS = {"int8 GEMM / conv": ("QLinear", "QGemm", "Integer", "QAttention", "DynamicQuantizeMatMul"),
              "float GEMM / conv": ("Conv", "MatMul", "Gemm"), "softmax": ("Softmax",),
              "QDQ + layout": ("QuantizeLinear", "DequantizeLinear", "Transpose", "Reorder")}  # fmt: skip


def ort_breakdown(path: Path, example: Any) -> dict[str, float]:
    """Kernel milliseconds per forward by operator group, from ONNX Runtime's own profiler (2 threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.enable_profiling = THREADS, 1, True
    options.profile_file_prefix = str(SCRATCH / "ort-profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {n: example[n].numpy() for n in names} if isinstance(example, dict) else {names[0]: example.numpy()}
    for _ in range(2 + RUNS):  # the first two are warm-up; the profile holds all, only the last RUNS are kept
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(kernels) // (2 + RUNS)
    by_op: Counter[str] = Counter()
    for event in kernels[-per_run * RUNS :]:
        by_op[event["args"]["op_name"]] += event["dur"] / 1000 / RUNS
    out = dict.fromkeys([*ORT_GROUPS, "other"], 0.0)
    for op, ms in by_op.items():
        group = next((g for g, keys in ORT_GROUPS.items() if any(k in op for k in keys)), "other")
        out[group] += ms
    out["total"] = sum(out.values())
    return out


def ort_rows(name: str, base: Any, task: Any, example: Any) -> list[str]:
    fp32 = export_onnx(base, example, SCRATCH / "profile-fp32.onnx")  # also the peer's starting point
    files = {"FP32 ONNX Runtime": fp32["path"],
             "bitsmith W8A8 -> ONNX Runtime": export_onnx(bitsmith_model(name, base, task), example,
                                                          SCRATCH / "profile-ours.onnx")["path"],
             "ONNX Runtime static QDQ per-channel": ort_static(base, task, example, fp32)[2]}  # fmt: skip
    if name == "cnn":
        files["bitsmith W8A8 + residual adds (both), pool input -> ONNX Runtime"] = export_onnx(
            bitsmith_model(name, base, task, residual_adds="both"), example, SCRATCH / "profile-residual.onnx"
        )["path"]
    lines = []
    for label, path in files.items():
        row = ort_breakdown(Path(path), example)
        lines.append(
            f"| {name} | {label} | " + " | ".join(f"{row[g]:.1f}" for g in [*ORT_GROUPS, "other", "total"]) + " |"
        )
        print(lines[-1], flush=True)
    return lines


def run(models: list[str]) -> tuple[list[str], list[str]]:
    torch.set_num_threads(THREADS)
    lines: list[str] = []
    ort_lines: list[str] = []
    for name in models:
        base, task = load(name)
        example = latency_example(name, task)
        ort_lines += ort_rows(name, base, task, example)
        paths = {
            "FP32 torch eager": base,
            "bitsmith W8A8 -> torchao PT2E": CompiledModel.from_model(bitsmith_model(name, base, task), example),
            "torchao PT2E X86Inductor (static)": torchao_pt2e(base, task, name, example),
        }
        if name == "cnn":
            paths["bitsmith W8A8 + residual adds (shortcut) -> torchao PT2E"] = CompiledModel.from_model(
                bitsmith_model(name, base, task, residual_adds="shortcut"), example
            )
        for label, model in paths.items():
            row = breakdown(model, example)
            cells = " | ".join(f"{row[g]:.1f}" for g in [*GROUPS, "other", "total"])
            lines.append(f"| {name} | {label} | {cells} |")
            print(lines[-1], flush=True)
    return lines, ort_lines


def write(lines: list[str], ort_lines: list[str]) -> None:
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
    ort = ["", "## ONNX Runtime paths (kernel ms per forward, ONNX Runtime's profiler)", "",
           "| model | path | " + " | ".join([*ORT_GROUPS, "other", "total"]) + " |",
           "|---|---|" + "---|" * (len(ORT_GROUPS) + 2)]  # fmt: skip
    atomic_write_text(RESULTS / "speed-profile.md", "\n".join([*header, *lines, *ort, *ort_lines, ""]))


if __name__ == "__main__":
    write(*run(sys.argv[1:] or list(BATCH)))
