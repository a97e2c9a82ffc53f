"""SQAP rows of the attention benchmark (issue 41, item 4): training-free token pruning inside the post-training
quantized zoo ViT. Per precision: the quantized model unpruned, naive quantize-then-prune (the ``keep`` most attended
tokens by the quantized model's own class attention, ``criterion: top``), the same with the FP32 block's attention as
the criterion (what the unquantized criterion would keep; with the overlap of the two kept sets), SQAP's criteria
(``criterion: sqap``), the Hadamard rotation alone (``hadamard`` on the attention projections, then ``top``) and both
(SQAP). The pruned variants drop the same number of tokens at the same place, so they run the same shapes: the
latency row times them, stripped to float kernels, against the unpruned model in one interleaved run."""

from __future__ import annotations

import copy
import random
import statistics
from typing import Any

import torch
from common import table_rows

from bitsmith import build_method, compress
from bitsmith.eval.latency import time_forward
from bitsmith.methods.attention.sqap import kept_overlap
from bitsmith.nn import PrunedBlock, strip
from bitsmith.train import accuracy
from bitsmith.zoo import pretrained
from bitsmith.zoo.data import load_fashion_mnist

CALIB, AT, KEEP, PRESERVE = 512, 1, 0.5, 0.25
BITS = {"FP32": None, "W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
ROTATE = {"name": "hadamard", "where": {"include": ["*.attn.qkv"]}}
VARIANTS = {
    "unpruned": (False, None),
    "quantize-then-prune (top attention)": (False, "top"),
    "SQAP criteria": (False, "sqap"),
    "Hadamard + top attention": (True, "top"),
    "SQAP (Hadamard + criteria)": (True, "sqap"),
}


def config(bits: str, variant: str, keep: float = KEEP, preserve: float = PRESERVE) -> list[dict[str, Any]]:
    rotate, criterion = VARIANTS[variant]
    methods: list[dict[str, Any]] = [ROTATE] if rotate and BITS[bits] else []
    if BITS[bits]:
        w, a = BITS[bits]  # type: ignore[misc]
        methods.append({"name": "ptq", "w_bits": w, "a_bits": a})
    if criterion:
        methods.append({"name": "sqap", "keep": keep, "at": AT, "criterion": criterion, "preserve": preserve})
    return methods


CONFIGS: dict[str, list[dict[str, Any]]] = {
    f"{bits}: {variant}": config(bits, variant)
    for bits in BITS
    for variant in VARIANTS
    if BITS[bits] or not VARIANTS[variant][0]
}
CONFIGS |= {f"W4A8: SQAP, preserve {p}": config("W4A8", "SQAP (Hadamard + criteria)", preserve=p)
            for p in (0.0, 0.5, 0.75, 1.0)}  # fmt: skip
CONFIGS |= {f"W4A8, keep {k}: {v}": config("W4A8", v, keep=k)
            for k in (0.25, 0.75) for v in ("quantize-then-prune (top attention)", "SQAP (Hadamard + criteria)")}  # fmt: skip


def build(methods: list[dict[str, Any]]) -> torch.nn.Module:
    x, y = load_fashion_mnist("train")
    model = pretrained("vit")
    compress(
        model, [build_method(m) for m in methods], [(x[i : i + 128], y[i : i + 128]) for i in range(0, CALIB, 128)]
    )
    return model.eval()


def row(label: str) -> dict[str, Any]:
    methods = CONFIGS[label]
    xt, yt = load_fashion_mnist("test")
    model = build(methods)
    out: dict[str, Any] = {"accuracy": accuracy(model, xt, yt), "config": methods}
    wrapped = next((m for m in model.modules() if isinstance(m, PrunedBlock)), None)
    if wrapped is not None and any(m["name"] == "ptq" for m in methods):
        reference = copy.deepcopy(pretrained("vit").blocks[AT]).eval()  # the FP32 block: the unquantized criterion
        out["kept_overlap"] = kept_overlap(model, reference, xt[:2000])
        wrapped.read_criterion_from(reference)
        out["accuracy_fp32_criterion"] = accuracy(model, xt, yt)
        wrapped.read_criterion_from(None)
    return out


MINILM_AT = 2  # tokens dropped before layer 2 of 6
MINILM_ROTATE = {"name": "hadamard", "where": {"include": ["*.attention.self.query", "*.attention.self.key",
                                                           "*.attention.self.value"]}}  # fmt: skip


def minilm_config(bits: str, variant: str, preserve: float = PRESERVE) -> list[dict[str, Any]]:
    methods = config(bits, variant, preserve=preserve)
    for m in methods:
        if m["name"] == "sqap":
            m["at"] = MINILM_AT
    return [MINILM_ROTATE if m["name"] == "hadamard" else m for m in methods]


MINILM_CONFIGS: dict[str, list[dict[str, Any]]] = {
    f"MiniLM {bits}: {variant}": minilm_config(bits, variant)
    for bits in ("FP32", "W8A8")
    for variant in VARIANTS
    if BITS[bits] or not VARIANTS[variant][0]
}
MINILM_CONFIGS |= {f"MiniLM W8A8: SQAP, preserve {p}": minilm_config("W8A8", "SQAP (Hadamard + criteria)", p)
                   for p in (0.5, 0.75)}  # fmt: skip


def minilm_row(label: str) -> dict[str, Any]:
    from common import load

    model, task = load("minilm")
    fp32 = task.evaluate(model)  # the first model evaluated is the cosine's FP32 reference
    compress(model, [build_method(m) for m in MINILM_CONFIGS[label]], task.calibration)
    return {**task.evaluate(model.eval()), "fp32_retrieval": fp32["retrieval"], "config": MINILM_CONFIGS[label]}


LATENCY_VARIANTS = ("W4A8: unpruned", "W4A8: quantize-then-prune (top attention)", "W4A8: SQAP (Hadamard + criteria)")
MINILM_LATENCY = ("MiniLM W8A8: unpruned", "MiniLM W8A8: SQAP (Hadamard + criteria)")


def latency_row(rounds: int = 15, batch: int = 64) -> dict[str, Any]:
    """The W4A8 models stripped to float kernels (what eager PyTorch runs; the rotation folded back), unpruned and
    pruned, timed in interleaved rounds (each once per round in a random order; 5 forwards, 2 threads; run alone)."""
    from common import load

    models = {label: strip(build(CONFIGS[label])) for label in LATENCY_VARIANTS}
    examples = {label: load_fashion_mnist("test")[0][:batch] for label in LATENCY_VARIANTS}
    for label in MINILM_LATENCY:
        model, task = load("minilm")
        compress(model, [build_method(m) for m in MINILM_CONFIGS[label]], task.calibration)
        models[label], examples[label] = strip(model.eval()), task.example(32)
    times: dict[str, list[float]] = {label: [] for label in models}
    order = random.Random(0)
    for _ in range(rounds):
        labels = list(models)
        order.shuffle(labels)
        for label in labels:
            timing = time_forward(models[label], examples[label], runs=5, warmup=1, num_threads=2)
            times[label].append(timing.median_ms)
    return {"latency_ms": {label: statistics.median(t) for label, t in times.items()},
            "range_over_median": {label: (max(t) - min(t)) / statistics.median(t) for label, t in times.items()},
            "rounds": rounds, "threads": 2, "batch": batch, "cpu": torch.backends.cpu.get_cpu_capability()}  # fmt: skip


def page(rows: list[dict[str, Any]]) -> list[str]:
    done = [r for r in rows if r.get("section") == "sqap"]
    if not done:
        return []
    timing = next((r for r in rows if r.get("section") == "sqap-latency" and "error" not in r), None)
    lines = ["## Quantization-aware token pruning (SQAP)", "",
             f"`sqap` (docs/methods/sqap.md), training-free: the zoo ViT post-training quantized (`ptq`, per-channel "
             f"weights, per-tensor min-max activations, calibrated on {CALIB} training images), then {KEEP:.0%} of the "
             f"49 patch tokens dropped before block {AT} by the class token's attention in that block. *top*: the most "
             "attended (naive quantize-then-prune); *SQAP criteria*: the top quarter of the budget by attention, the "
             "rest spread evenly over the image (`preserve` 0.25); *Hadamard*: the attention projections' inputs "
             "rotated before quantization (`hadamard`). *FP32 criterion*: the same pruned model with the tokens chosen "
             "by the FP32 block's attention; *overlap*: Jaccard overlap of the quantized and FP32 criteria's kept sets "
             "(first 2,000 test images). Top-1 on the 10,000 test images.", "",
             "| variant | top-1 | top-1, FP32 criterion | kept overlap | load |", "|---|---|---|---|---|"]  # fmt: skip
    lines += table_rows(done, lambda r: [
        r["variant"], f"{100 * r['accuracy']:.2f}",
        f"{100 * r['accuracy_fp32_criterion']:.2f}" if "accuracy_fp32_criterion" in r else "—",
        f"{r['kept_overlap']:.3f}" if "kept_overlap" in r else "—", f"{r['load'][0]:.2f}"], 5)  # fmt: skip
    text = [r for r in rows if r.get("section") == "sqap-minilm"]
    if text:
        lines += ["", f"all-MiniLM-L6-v2 (`ptq` calibrated on 128 docstring sentences): {KEEP:.0%} of the tokens after "
                  f"[CLS] dropped before layer {MINILM_AT} of 6 by the [CLS] query's attention there (`PrunedEncoder`; "
                  "the Hadamard rotation on the query / key / value inputs); mean pooling over the kept tokens. Cosine "
                  "to the FP32 embeddings and recall@1 on the docstring pairs.", "",
                  "| variant | cosine | recall@1 | load |", "|---|---|---|---|"]  # fmt: skip
        lines += table_rows(text, lambda r: [r["variant"], f"{r['cosine']:.4f}", f"{r['retrieval']:.4f}",
                                             f"{r['load'][0]:.2f}"], 4)  # fmt: skip
    if timing:
        lines += ["", f"Latency (`--only \"sqap latency\"`, alone): one forward of {timing['batch']} test images, the "
                  "W4A8 models stripped to float kernels (eager PyTorch has no 4-bit kernels here; the rotation folded "
                  f"back), {timing['threads']} threads, {timing['rounds']} interleaved rounds, the median; CPU kernels "
                  f"{timing.get('cpu', 'not recorded')}; MiniLM: one forward of 32 sentences; 1-minute load {timing['load'][0]:.2f}.", "",
                  "| model | latency ms | speed-up | range / median |", "|---|---|---|---|"]  # fmt: skip
        ms = timing["latency_ms"]
        for label, value in ms.items():
            base = ms[MINILM_LATENCY[0] if label.startswith("MiniLM") else LATENCY_VARIANTS[0]]
            lines.append(f"| {label} | {value:.1f} | {base / value:.2f}x | {timing['range_over_median'][label]:.2f} |")
    return [*lines, ""]
