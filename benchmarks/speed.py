"""Real integer speed: FP32 vs bitsmith W8A8 deployed (ONNX Runtime QDQ, torchao PT2E + Inductor) vs the
peers' int8 paths on the same models, 2 threads, all timed in one process.

Models and latency inputs: all-MiniLM-L6-v2 (batch 32 x 128 tokens), the zoo CNN and ViT (batch 256).
Latency: median of 10 runs after 2 warm-up runs. Quality: MiniLM cosine of mean-pooled embeddings to
FP32 and recall@1 on the docstring pairs; CNN / ViT top-1 on the 10,000 test images. Agreement: cosine
between the deployed and bitsmith's fake-quant outputs (real tokens only). File: what one ships (packed
safetensors for bitsmith, the ONNX file for ONNX Runtime; the peers' in-memory paths have none).
Quantize s: calibration + conversion + export / compile.

bitsmith settings: per-channel min-max weights, static per-tensor min-max inputs, 512 calibration images
or 128 sentences; MiniLM uses SmoothQuant first on every Linear, alpha 0.85 (``recipes/minilm-smoothquant-
w8a8-deploy.yaml``; alpha picked from 0.5 / 0.75 / 0.85 / 0.9 on these docstring pairs, no separate
validation split) and stores its embedding tables as 8-bit rows.
Peers: torchao PT2E with the default X86InductorQuantizer config (static), compiled with freezing;
ONNX Runtime ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, min-max on the same
calibration batches) and ``quantize_dynamic`` (per-channel int8 weights, dynamic activations) of the FP32 ONNX file;
``torch.ao.quantization.quantize_dynamic`` (int8 Linear).

Regenerate: ``make bench-speed`` (``python benchmarks/speed.py [minilm cnn vit]``) on an otherwise idle
machine. Writes ``docs/results/speed.md`` / ``speed.png``; rows are kept in ``speed.json`` and
``speed-files.json`` (resumable).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, Rows, load, save_figure  # noqa: E402
from torch import nn  # noqa: E402

from bitsmith import compress  # noqa: E402
from bitsmith.deploy import agreement, deploy, int8_pairs_saturate  # noqa: E402
from bitsmith.eval.latency import measure_latency  # noqa: E402
from bitsmith.eval.tasks import Task  # noqa: E402
from bitsmith.export.checkpoint import save  # noqa: E402
from bitsmith.export.onnx import OnnxRuntimeModel, export_onnx  # noqa: E402
from bitsmith.export.pt2e import CompiledModel, export_graph  # noqa: E402
from bitsmith.export.qdq import KeywordInputs  # noqa: E402
from bitsmith.files import atomic_write_text  # noqa: E402
from bitsmith.methods.ptq.ptq import PTQ  # noqa: E402
from bitsmith.methods.ptq.smoothquant import SmoothQuant  # noqa: E402

THREADS = 2
BATCH = {"minilm": 32, "cnn": 256, "vit": 256}
TOKENS = 128
RUNS = 10
RESIDUAL_PATHS = ["bitsmith W8A8 + residual adds (both), pool input -> ONNX Runtime",
                  "bitsmith W8A8 + residual adds (shortcut) -> torchao PT2E"]  # fmt: skip
PATHS = ["FP32 torch eager", "bitsmith W8A8 -> ONNX Runtime", "bitsmith W8A8 -> torchao PT2E", *RESIDUAL_PATHS,
         "torchao PT2E X86Inductor (static)", "ONNX Runtime static QDQ per-channel", "ONNX Runtime dynamic per-channel",
         "torch dynamic int8 (Linear)"]  # fmt: skip
SCRATCH = Path(tempfile.mkdtemp(prefix="bitsmith-speed-"))
CONTROL = ", built again (A/A control)"  # the peer built twice: how far apart two equal graphs time (paired, profile)


def machine() -> dict[str, Any]:
    """What the timings depend on: torch's CPU kernel level and whether int8 dot products have VNNI."""
    return {"cpu": torch.backends.cpu.get_cpu_capability(), "vnni": not int8_pairs_saturate()}


def machine_line(rows: list[dict[str, Any]]) -> str:
    kinds = sorted({(r.get("cpu", "AVX512 (not recorded)"), r.get("vnni", True)) for r in rows})
    described = [f"{cpu}, {'with' if vnni else 'without'} VNNI" for cpu, vnni in kinds]
    note = "" if all(v for _, v in kinds) else (" Without VNNI, int8 GEMMs add u8 x s8 products in pairs in int16, "
                                               "which saturates with 8-bit weights (see the agreement column).")  # fmt: skip
    loads = [r["load"][0] for r in rows if r.get("load")]
    load = f" 1-minute load average after each row: {min(loads):.2f} to {max(loads):.2f}." if loads else ""
    return f"Machine: {'; '.join(described)} (torch's CPU capability).{load}{note}"


def latency_example(name: str, task: Task) -> Any:
    if name != "minilm":
        return task.test[0][: BATCH[name]].contiguous()
    texts = [text for pair in task.pairs for text in pair][: BATCH[name]]
    return dict(task.tokenizer(texts, padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt"))


def file_size(path: Path | str | None) -> int | None:
    return None if path is None else Path(path).stat().st_size


def bitsmith_model(
    name: str, base: nn.Module, task: Task, residual_adds: str = "none", smooth_layers: str = "all"
) -> nn.Module:
    """W8A8 (the recipe ``minilm-smoothquant-w8a8-deploy.yaml`` for MiniLM, plain PTQ for CNN / ViT; with
    ``residual_adds`` the CNN's residual adds get quantized inputs too, and with ``both`` (for ONNX Runtime) its
    pool's input). ``smooth_layers``: SmoothQuant's ``layers`` for MiniLM (``norm-fed``: the paper's, no run-time
    division after the GELU, so the int8 fc1 runs the GELU in its epilogue; ``all``: the recipe's; ``outliers``:
    fc2's run-time scale only where its input's largest channel stands out, layers 0-2 on MiniLM)."""
    model = copy.deepcopy(base)
    if name != "minilm":
        method = PTQ(w_bits=8, a_bits=8, residual_adds=residual_adds, pool_inputs=residual_adds == "both")
        compress(model, method, task.calibration)
        return model
    encoder, tables = {"include": ["encoder.*"]}, {"types": ["Embedding"], "include": ["embeddings.*"]}
    methods = [SmoothQuant(alpha=0.85, layers=smooth_layers, where=encoder),
               PTQ(w_bits=8, a_bits=8, where={"include": ["encoder.*", "pooler.*"]}),
               PTQ(w_bits=8, a_bits=None, where=tables)]  # fmt: skip
    compress(model, methods, task.calibration)
    return model


def torchao_pt2e(model: nn.Module, task: Task, name: str, example: Any) -> CompiledModel:
    """The peer's own flow: export, prepare with X86InductorQuantizer, calibrate, convert, compile.
    Token models are exported with keyword inputs and all their outputs (torchao's annotator fails on
    a graph whose pooler output was dropped)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    keyed = isinstance(example, dict)
    if keyed:
        names, tensors = list(example), list(example.values())
        dynamic = {n: {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for n in names}
        graph = torch.export.export(copy.deepcopy(model), (), kwargs=example, dynamic_shapes=dynamic).module()
    else:
        graph, names, tensors = export_graph(copy.deepcopy(model), example)
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for batch in task.calibration:
            prepared(**{n: batch[n] for n in names}) if keyed else prepared(batch)
    converted = convert_pt2e(prepared)
    return CompiledModel(KeywordInputs(converted, names) if keyed else converted, names, tensors, keyed=keyed)


def ort_static(
    model: nn.Module, task: Task, example: Any, exported: dict[str, Any] | None = None
) -> tuple[OnnxRuntimeModel, None, Path]:
    """ONNX Runtime's own static quantization of the FP32 ONNX file: QDQ format, per-channel int8 weights,
    uint8 activations, min-max calibration on the same batches as bitsmith's (after ``quant_pre_process``).
    Image models with its defaults (every op it can quantize); MiniLM with MatMul / Gemm only, as bitsmith
    quantizes only its Linear layers (its defaults also quantize the norms and the embedding gathers:
    cosine 0.35 to FP32 in a trial run). ``exported``: ``export_onnx``'s answer for the FP32 file, if one exists."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    exported = exported or export_onnx(model, example, SCRATCH / "fp32-static.onnx")
    fp32, ready, names = exported["path"], SCRATCH / "fp32-static-pre.onnx", exported["inputs"]
    with contextlib.chdir(SCRATCH):  # its tools leave temporary files in the working directory
        quant_pre_process(str(fp32), str(ready), skip_symbolic_shape=True)  # the encoder defeats symbolic inference

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            feeds = [{n: b[n].numpy() for n in names} if isinstance(b, dict) else {names[0]: b.numpy()}
                     for b in task.calibration]  # fmt: skip
            self.feeds = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.feeds, None)

    path = SCRATCH / "static.onnx"
    ops = {"op_types_to_quantize": ["MatMul", "Gemm"]} if isinstance(example, dict) else {}
    with contextlib.chdir(SCRATCH):
        quantize_static(str(ready), str(path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **ops)  # fmt: skip
    return OnnxRuntimeModel(path, threads=THREADS), None, path


def ort_dynamic(model: nn.Module, example: Any) -> tuple[OnnxRuntimeModel, None, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = SCRATCH / "fp32.onnx"
    export_onnx(model, example, fp32)
    path = SCRATCH / "dynamic.onnx"
    quantize_dynamic(str(fp32), str(path), per_channel=True, weight_type=QuantType.QInt8)
    return OnnxRuntimeModel(path, threads=THREADS), None, path


def torch_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def measure(task: Task, reference: nn.Module | None, runner: Any, example: Any) -> dict[str, Any]:
    out: dict[str, Any] = {**task.evaluate(runner), "latency_ms": measure_latency(runner, example, runs=RUNS)}
    if reference is not None:
        out["agreement"] = agreement(runner, reference, example)
    return out


def run_model(name: str, rows: Rows, base: nn.Module, task: Task) -> None:
    """Every path's row for one model (rows already in the file are kept); ``task`` has evaluated ``base``."""
    example = latency_example(name, task)

    def record(path: str, build: Any, ours: bool = False) -> None:
        if rows.done(model=name, path=path):
            return
        start = time.perf_counter()
        try:
            runner, reference, shipped = build()
        except Exception as exc:  # a peer that does not handle this model is reported, not fatal
            print(f"{name} / {path}: failed: {exc!r}"[:500], flush=True)
            return
        seconds = time.perf_counter() - start
        row = {"model": name, "path": path, "bitsmith": ours, **measure(task, reference, runner, example),
               "quantize_s": seconds, "file_bytes": file_size(shipped), **machine()}  # fmt: skip
        rows.add(row)
        print(row, flush=True)

    def fp32() -> tuple[Any, None, Path]:
        save(base, SCRATCH / "fp32.safetensors")
        return base, None, SCRATCH / "fp32.safetensors"

    def ours(backend: str, residual_adds: str = "none") -> Any:
        def build() -> tuple[Any, nn.Module, Path]:
            model = bitsmith_model(name, base, task, residual_adds)
            deployment = deploy(model, example, backend, SCRATCH / backend, num_threads=THREADS)
            if deployment.path is not None:
                return deployment.model, model, Path(deployment.path)
            save(model, SCRATCH / "w8a8.safetensors")
            return deployment.model, model, SCRATCH / "w8a8.safetensors"

        return build

    residual = [ours("onnxruntime", "both"), ours("torchao", "shortcut")] if name == "cnn" else [None, None]
    builders = [fp32, ours("onnxruntime"), ours("torchao"), *residual,
                lambda: (torchao_pt2e(base, task, name, example), None, None),
                lambda: ort_static(base, task, example), lambda: ort_dynamic(base, example),
                lambda: (torch_dynamic(base), None, None)]  # fmt: skip
    for path, build in zip(PATHS, builders, strict=True):
        if build is not None:
            record(path, build, ours=path.startswith("bitsmith"))


def weight_only_4bit(name: str, base: nn.Module, task: Task) -> nn.Module:
    """W4 weight-only: per-channel min-max (CNN / ViT); MiniLM per-group 128 with 4-bit embedding rows."""
    model = copy.deepcopy(base)
    if name != "minilm":
        compress(model, PTQ(w_bits=4, a_bits=None), task.calibration)
        return model
    tables = {"types": ["Embedding"], "include": ["embeddings.*"]}
    compress(model, [PTQ(w_bits=4, a_bits=None, w_granularity="group", where={"include": ["encoder.*", "pooler.*"]}),
                     PTQ(w_bits=4, a_bits=None, where=tables)], task.calibration)  # fmt: skip
    return model


FILES = {"FP32": lambda name, base, task: base, "W8A8 (as deployed above)": bitsmith_model,
         "W4 weight-only": weight_only_4bit}  # fmt: skip


def file_rows(name: str, rows: Rows, base: nn.Module, task: Task) -> None:
    """Packed safetensors size and quality of the FP32, 8-bit and 4-bit models."""
    for setting, build in FILES.items():
        if not rows.done(model=name, setting=setting):
            model = build(name, base, task)
            path = save(model, SCRATCH / "file.safetensors")
            rows.add({"model": name, "setting": setting, "file_bytes": file_size(path), **task.evaluate(model)})


def run(models: list[str]) -> None:
    torch.set_num_threads(THREADS)
    rows, files = Rows(RESULTS / "speed.json"), Rows(RESULTS / "speed-files.json")
    for name in models:
        base, task = load(name)
        task.evaluate(base)  # MiniLM: the FP32 embeddings are the cosine reference
        file_rows(name, files, base, task)
        run_model(name, rows, base, task)
    write(rows.rows, files.rows)


def quality(row: dict[str, Any]) -> str:
    if "cosine" in row:
        return f"cos {row['cosine']:.4f}, R@1 {100 * row['retrieval']:.2f}"
    return f"top-1 {100 * row['accuracy']:.2f}"


def file_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Packed file size", "",
             "The packed safetensors file alone (codes, scales, float norms and biases, header), re-measured in",
             "its own step. 4-bit: per-channel min-max weights (CNN / ViT); MiniLM per group of 128 inputs,",
             "its embedding tables as 4-bit rows, no activation quantization.", "",
             "| model | weights | file KB | file / FP32 | quality |", "|---|---|---|---|---|"]  # fmt: skip
    for name in BATCH:
        mine = [r for r in rows if r["model"] == name]
        fp32 = next((r for r in mine if r["setting"] == "FP32"), None)
        for r in mine if fp32 else []:
            lines.append(f"| {name} | {r['setting']} | {r['file_bytes'] / 1024:,.0f} | "
                         f"{r['file_bytes'] / fp32['file_bytes']:.1%} | {quality(r)} |")  # fmt: skip
    return lines


def write(rows: list[dict[str, Any]], files: list[dict[str, Any]]) -> None:
    """speed.md and speed.png from the rows."""
    lines = [
        "# Real integer speed: FP32 vs deployed int8 (2 threads)",
        "",
        (__doc__ or "").split("\n\n")[1].replace("\n", " "),
        "",
        "Regenerate: `make bench-speed` (`python benchmarks/speed.py`), on an otherwise idle machine. Timings",
        "move by up to about 20% between runs on the same machine (on an earlier machine the ViT's torchao rows",
        "ranged 39 to 47 ms; here the profile run put the CNN's two torchao paths in the opposite order): compare",
        "rows of one run, as here. The CNN's rows come from a later run on the same machine than the MiniLM and",
        "ViT rows (`python benchmarks/speed.py cnn`, after PTQ's `residual_adds` was added); compare rows within",
        "a model. The paths of one backend timed in turns, so that drift hits them alike: [speed-paired.md]",
        "(speed-paired.md).",
        "",
        machine_line(rows),
        "",
        "| model | path | latency ms | speedup | quality | agreement | file MB | file / FP32 | quantize s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, name in zip(axes, BATCH, strict=True):
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: PATHS.index(r["path"]))
        fp32 = next((r for r in mine if r["path"] == "FP32 torch eager"), None)
        if not mine or fp32 is None:
            continue
        for r in mine:
            size = r["file_bytes"]
            cells = [name, ("**" + r["path"] + "**") if r["bitsmith"] else r["path"], f"{r['latency_ms']:.1f}",
                     f"{fp32['latency_ms'] / r['latency_ms']:.2f}x", quality(r),
                     f"{r['agreement']:.5f}" if "agreement" in r else "-",
                     f"{size / 2**20:.1f}" if size else "-", f"{size / fp32['file_bytes']:.0%}" if size else "-",
                     f"{r['quantize_s']:.1f}" if r["path"] != "FP32 torch eager" else "-"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        speed = [fp32["latency_ms"] / r["latency_ms"] for r in mine]
        colors = ["tab:orange" if r["bitsmith"] else "tab:gray" for r in mine]
        ax.barh([r["path"] for r in mine], speed, color=colors)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.invert_yaxis()
        ax.set_title(f"{name} (batch {BATCH[name]}{' x 128 tokens' if name == 'minilm' else ''})")
        ax.set_xlabel("speedup over FP32 torch eager")
    save_figure(figure, "speed.png")
    lines += ["", "![speedup over FP32](speed.png)", *file_table(files), ""]
    atomic_write_text(RESULTS / "speed.md", "\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-only"]:
        write(Rows(RESULTS / "speed.json").rows, Rows(RESULTS / "speed-files.json").rows)
    else:
        run(sys.argv[1:] or list(BATCH))
