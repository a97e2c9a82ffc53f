"""Where the deployed int8 models spend their time: bitsmith's torchao PT2E path vs the peer's own flow, op by op.

The same latency inputs as ``speed.py`` (MiniLM 32 x 128 tokens, CNN / ViT 256 images, 2 threads). Each compiled
model runs ``RUNS`` times under ``torch.profiler`` with Inductor's kernel profiling on, so every generated kernel
is an event of its own, named after the ops it fuses (``cpp_fused_add_div_native_layer_norm_quantize_per_tensor``).
Self CPU time per forward is split into int8 GEMMs / convolutions (oneDNN ``qlinear`` / ``qconv``), attention
(``scaled_dot_product``, its mask kernel included), float GEMMs / convolutions (the FP32 model) and *everything
else*: quantize / dequantize, SmoothQuant scaling, norms, activations, layout copies, the compiled graph's call
overhead. That split does not depend on how fast a machine's int8 GEMMs are, so the comparison of the two graphs'
*everything else* holds on any CPU. The op-by-op table names every op that bitsmith's graph runs more often than
the peer's (counted inside the fused kernels) with the time of the kernels that contain it. The peer is profiled a
second time from a second build (*A/A control*): its difference from the first is the noise of one profile.

The ONNX Runtime paths (bitsmith's QDQ file vs ONNX Runtime's own static quantization, and the FP32 file) are
profiled with ONNX Runtime's profiler, each node's kernel time grouped by operator: integer kernels, float
GEMMs / convolutions (attention's two matmuls among them), softmax, quantize / dequantize and layout
conversions (``Transpose``, ``ReorderInput`` / ``ReorderOutput``), the rest.

Regenerate: ``python benchmarks/speed_profile.py [minilm cnn vit]`` on an otherwise idle machine (rows resume in
``speed-profile.json``; ``--write-only`` rewrites the page). Writes ``docs/results/speed-profile.md``.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, Rows, load
from speed import (
    BATCH,
    CONTROL,
    SCRATCH,
    THREADS,
    bitsmith_model,
    latency_example,
    machine,
    machine_line,
    ort_static,
    torchao_pt2e,
)
from torch.profiler import ProfilerActivity, profile

from bitsmith.export.onnx import export_onnx
from bitsmith.export.pt2e import CompiledModel
from bitsmith.files import atomic_write_text

RUNS = 20
GROUPS = {"int8 GEMM / conv": ("onednn::q",), "attention": ("scaled_dot_product",),
          "float GEMM / conv": ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "mkldnn_convolution")}  # fmt: skip
ELSE = "everything else"
BOOKKEEPING = ("aten::view", "aten::empty", "aten::as_strided", "aten::transpose", "aten::reshape", "aten::expand",
               "aten::item", "aten::_local_scalar_dense", "aten::empty_strided", "aten::empty_like", "aten::t",
               "aten::permute", "aten::detach", "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select",
               "## Call", "TorchDynamo", "Torch-Compiled Region", "Pregraph", "AOTDispatcher", "aten::resolve",
               "aten::contiguous", "aten::alias")  # fmt: skip
# Op names inside Inductor kernel names (joined by "_"): the multi-word ones, longest first
FUSED_OPS = sorted(["native_layer_norm", "quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel",
                    "dequantize_per_channel", "_to_copy", "bitwise_and", "_scaled_dot_product_flash_attention_for_cpu",
                    "constant_pad_nd", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d", "logical_and",
                    "clamp_min", "clamp_max", "native_batch_norm", "_native_batch_norm_legit_no_training"],
                   key=len, reverse=True)  # fmt: skip
META_OPS = {"view", "transpose", "permute", "expand", "slice", "unsqueeze", "squeeze", "select", "clone", "_to_copy",
            "arange", "index", "full", "ge", "lt", "bitwise_and"}  # fmt: skip


def call(model: Any, example: Any) -> Any:
    with torch.no_grad():
        return model(**example) if isinstance(example, dict) else model(example)


def kernel_name(key: str) -> str:
    """An Inductor kernel's name without its graph prefix and index (``graph_0_cpp_fused_gelu_8`` -> ``cpp_fused_gelu``)."""
    return re.sub(r"_\d+$", "", re.sub(r"^graph_\d+_", "", key)) if "cpp_fused" in key else key


def fused_ops(name: str) -> list[str]:
    """The ops an Inductor kernel fuses, read from its name (multi-word op names matched first)."""
    rest, ops = name.removeprefix("cpp_fused_"), []
    while rest:
        op = next((o for o in FUSED_OPS if rest == o or rest.startswith(o + "_")), None)
        if op is None and rest.startswith("_"):
            rest = rest[1:]
            continue
        op = op or rest.split("_", 1)[0]
        ops.append(op)
        rest = rest[len(op) :].removeprefix("_")
    return ops


def op_profile(model: Any, example: Any) -> dict[str, list[float]]:
    """``{op or kernel: [calls per forward, self CPU ms per forward]}`` over ``RUNS`` profiled forwards."""
    for _ in range(2):
        call(model, example)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(RUNS):
            call(model, example)
    out: dict[str, list[float]] = {}
    for event in prof.key_averages():
        entry = out.setdefault(kernel_name(event.key), [0.0, 0.0])
        entry[0] += event.count / RUNS
        entry[1] += event.self_cpu_time_total / 1000 / RUNS
    return out


def group_of(op: str) -> str:
    return next((g for g, keys in GROUPS.items() if any(k in op for k in keys)), ELSE)


def breakdown(ops: dict[str, list[float]]) -> dict[str, float]:
    """Milliseconds per forward by group, the total, and the compute ops run per forward (bookkeeping excluded)."""
    out = dict.fromkeys([*GROUPS, ELSE], 0.0)
    for op, (_, ms) in ops.items():
        out[group_of(op)] += ms
    out["total"] = sum(out.values())
    out["ops per forward"] = sum(calls for op, (calls, _) in ops.items() if not op.startswith(BOOKKEEPING))
    return out


def op_counts(ops: dict[str, list[float]]) -> tuple[Counter[str], Counter[str]]:
    """(how often each op runs per forward, ms of the kernels containing it): fused kernels count each op they fuse."""
    count: Counter[str] = Counter()
    time: Counter[str] = Counter()
    for name, (calls, ms) in ops.items():
        if name.startswith(BOOKKEEPING):
            continue
        for op in dict.fromkeys(fused_ops(name)) if name.startswith("cpp_fused") else [name]:
            count[op] += calls
            time[op] += ms
    return count, time


def extra_ops(ours: dict[str, list[float]], peer: dict[str, list[float]]) -> list[tuple[str, float, float, float]]:
    """Ops bitsmith runs more often than the peer: (op, our calls, the peer's calls, ms of our kernels with it)."""
    (count, time), (peer_count, _) = op_counts(ours), op_counts(peer)
    rows = [(op, count[op], peer_count[op], time[op]) for op in count if count[op] > peer_count[op] + 1e-9]
    return sorted((r for r in rows if r[0].split("::")[-1] not in META_OPS), key=lambda r: (-r[3], r[0]))


def torch_paths(name: str, base: Any, task: Any, example: Any) -> dict[str, Any]:
    """Builders of the profiled torch paths (built one at a time)."""

    def ours(**settings: Any) -> Any:
        return lambda: CompiledModel.from_model(bitsmith_model(name, base, task, **settings), example)

    peer = "torchao PT2E X86Inductor (static)"
    paths = {
        "FP32 torch eager": lambda: base,
        "bitsmith W8A8 -> torchao PT2E": ours(),
        peer: lambda: torchao_pt2e(base, task, name, example),
        peer + CONTROL: lambda: torchao_pt2e(base, task, name, example),
    }
    if name == "minilm":
        paths["bitsmith W8A8, SmoothQuant norm-fed -> torchao PT2E"] = ours(smooth_layers="norm-fed")
    if name == "cnn":
        paths["bitsmith W8A8 + residual adds (shortcut) -> torchao PT2E"] = ours(residual_adds="shortcut")
    return paths


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


def ort_paths(name: str, base: Any, task: Any, example: Any) -> dict[str, Any]:
    fp32 = SCRATCH / "profile-fp32.onnx"

    def ours(path: str, **settings: Any) -> Any:
        return lambda: export_onnx(bitsmith_model(name, base, task, **settings), example, SCRATCH / path)["path"]

    paths = {"FP32 ONNX Runtime": lambda: export_onnx(base, example, fp32)["path"],
             "bitsmith W8A8 -> ONNX Runtime": ours("profile-ours.onnx"),
             "ONNX Runtime static QDQ per-channel": lambda: ort_static(base, task, example,
                                                                       export_onnx(base, example, fp32))[2]}  # fmt: skip
    if name == "cnn":
        paths["bitsmith W8A8 + residual adds (both), pool input -> ONNX Runtime"] = ours(
            "profile-residual.onnx", residual_adds="both"
        )
    return paths


def run(models: list[str]) -> None:
    torch.set_num_threads(THREADS)
    torch._inductor.config.cpp.enable_kernel_profile = True  # one profiler event per generated kernel
    rows = Rows(RESULTS / "speed-profile.json")
    for name in models:
        base, task = load(name)
        example = latency_example(name, task)
        for backend, paths in (("torch", torch_paths), ("onnxruntime", ort_paths)):
            for label, build in paths(name, base, task, example).items():
                if rows.done(model=name, path=label):
                    continue
                if backend == "torch":
                    ops = op_profile(build(), example)
                    row = {"model": name, "backend": backend, "path": label, **breakdown(ops), "ops": ops}
                else:
                    row = {"model": name, "backend": backend, "path": label, **ort_breakdown(Path(build()), example)}
                rows.add({**row, **machine()})
                print(name, label, f"{row['total']:.1f} ms", flush=True)
    write(rows.rows)


def is_ours(row: dict[str, Any]) -> bool:
    """bitsmith's paths and the A/A control: the rows compared with the peer."""
    return row["path"].startswith("bitsmith") or row["path"].endswith(CONTROL)


def peer_of(rows: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in rows if r["model"] == row["model"] and r["backend"] == row["backend"]
                 and not is_ours(r) and not r["path"].startswith("FP32")), None)  # fmt: skip


def write(rows: list[dict[str, Any]]) -> None:
    doc = (__doc__ or "").split("\n\n")
    torch_rows = [r for r in rows if r["backend"] == "torch"]
    columns = [*GROUPS, ELSE, "total"]
    lines = ["# Where the int8 time goes (self CPU ms per forward, 2 threads)", "", doc[1].replace("\n", " "), "",
             doc[3].replace("\n", " "), "", machine_line(rows), "",
             "| model | path | " + " | ".join(columns) + " | ops per forward | everything else vs the peer |",
             "|---|---|" + "---|" * (len(columns) + 2)]  # fmt: skip
    for r in torch_rows:
        peer = peer_of(rows, r)
        versus = f"{r[ELSE] - peer[ELSE]:+.1f} ms" if peer is not None and is_ours(r) else ""
        cells = " | ".join(f"{r[c]:.1f}" for c in columns)
        lines.append(f"| {r['model']} | {r['path']} | {cells} | {r['ops per forward']:.0f} | {versus} |")
    lines += ["", "## Ops bitsmith's graph runs more often than the peer's", "",
              "Per forward; an op inside a fused kernel counts once per call of that kernel, and its time is the "
              "time of the kernels containing it (shared with the ops fused beside it). Layout-only ops (views, "
              "transposes, copies, index arithmetic) are left out.", "",
              "| model | path | op | bitsmith calls | peer calls | ms of bitsmith's kernels with it |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in torch_rows:
        peer = peer_of(rows, r)
        if peer is None or not is_ours(r):
            continue
        extra = extra_ops(r["ops"], peer["ops"])
        lines += [f"| {r['model']} | {r['path']} | `{op}` | {ours:.0f} | {theirs:.0f} | {ms:.1f} |"
                  for op, ours, theirs, ms in extra] or [f"| {r['model']} | {r['path']} | (none) | | | |"]  # fmt: skip
    ort_columns = [*ORT_GROUPS, "other", "total"]
    lines += ["", "## ONNX Runtime paths (kernel ms per forward, ONNX Runtime's profiler)", "",
              "| model | path | " + " | ".join(ort_columns) + " |", "|---|---|" + "---|" * len(ort_columns)]  # fmt: skip
    lines += [f"| {r['model']} | {r['path']} | " + " | ".join(f"{r[c]:.1f}" for c in ort_columns) + " |"
              for r in rows if r["backend"] == "onnxruntime"]  # fmt: skip
    atomic_write_text(RESULTS / "speed-profile.md", "\n".join([*lines, ""]))


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-only"]:
        write(Rows(RESULTS / "speed-profile.json").rows)
    else:
        run(sys.argv[1:] or list(BATCH))
