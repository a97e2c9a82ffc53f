"""Deploy a compressed model on an integer backend and check it against bitsmith's fake-quant model.

Backends: ``onnxruntime`` (QDQ ONNX, :mod:`bitsmith.export.onnx`), ``torchao`` (torch.export +
Inductor with torchao's x86 int8 passes, :mod:`bitsmith.export.pt2e`) and ``torch`` (the QDQ model in
eager PyTorch: always available, never faster). ``auto`` builds every installed integer backend,
times each on the example and keeps the fastest; it also times the model in float (its quantized weights,
no integer kernels) and says so, in a warning, when even the fastest integer backend is slower here.
"""

from __future__ import annotations

import copy
import importlib.util
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.eval.latency import measure_latency, threads
from bitsmith.export.qdq import quantized_layers
from bitsmith.method import run_forward
from bitsmith.nn import strip
from bitsmith.quant.attention import uses_int8_attention

BACKENDS = ("onnxruntime", "torchao", "torch")


@dataclass
class Deployment:
    backend: str
    model: Any  # callable like the original model
    fallbacks: dict[str, str]
    seconds: float  # time to export / compile
    path: str | None = None  # the ONNX file, for onnxruntime
    timings: dict[str, float] = field(default_factory=dict)  # auto: milliseconds per backend tried
    integer_layers: int = 0  # layers that run in integer kernels (quantized and not fallen back to float)


def available_backends() -> list[str]:
    """The backends installed here, integer ones first."""
    from bitsmith.export.pt2e import pt2e_available

    found = [] if importlib.util.find_spec("onnxruntime") is None else ["onnxruntime"]
    return [*found, *(["torchao"] if pt2e_available() else []), "torch"]


def int8_pairs_saturate() -> bool:
    """An x86 CPU without VNNI: its int8 GEMMs (ONNX Runtime's, oneDNN's) add u8 x s8 products in pairs in int16
    (``vpmaddubsw``), which saturates when 8-bit weights meet large activation codes; 7-bit weights are exact."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return not any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


INT8_SDPA_MISSING = {
    "onnxruntime": "ONNX Runtime's CPU provider has no integer attention kernel for a QDQ graph",
    "torchao": "torchao's int8 attention takes per-tensor static scales, where bitsmith's grids are per token and "
    "per channel, and it runs only as an AMX template or as torchao's C++ CPU op, which the PyPI wheel lacks",
}


def _build(model: nn.Module, example: Any, backend: str, out: Path, num_threads: int | None) -> Deployment:
    deployment = _export(model, example, backend, out, num_threads)
    if backend != "torch":
        integer = [n for n in quantized_layers(model) if n not in deployment.fallbacks]
        deployment.integer_layers = len(integer)
        wide = [n for n in integer if getattr(model.get_submodule(n).weight_q, "bits", 0) >= 8]
        if wide and int8_pairs_saturate():
            warnings.warn(f"{backend}: this CPU has no VNNI, so its int8 kernels sum u8 x s8 products in pairs in "
                          f"int16, which saturates with 8-bit weights ({len(wide)} layers): the results drift from "
                          "the fake-quant model; quantize weights to 7 bits (w_bits: 7) for exact integer results "
                          "here", stacklevel=3)  # fmt: skip
    if backend != "torch" and uses_int8_attention(model):
        warnings.warn(f"{backend}: int8 attention is exported as its fake-quant grids computed with float kernels "
                      f"(same results; {INT8_SDPA_MISSING[backend]}), so it adds time here: set int8_attention: "
                      "false for speed", stacklevel=3)  # fmt: skip
    return deployment


def _export(model: nn.Module, example: Any, backend: str, out: Path, num_threads: int | None) -> Deployment:
    start = time.perf_counter()
    if backend == "onnxruntime":
        from bitsmith.export.onnx import OnnxRuntimeModel, export_onnx

        info = export_onnx(model, example, out / "model.onnx")
        runner = OnnxRuntimeModel(info["path"], threads=num_threads)
        return Deployment(backend, runner, info["fallbacks"], time.perf_counter() - start, info["path"])
    if backend == "torchao":
        from bitsmith.export.pt2e import CompiledModel

        with threads(num_threads):
            compiled = CompiledModel.from_model(model, example)
        return Deployment(backend, compiled, compiled.fallbacks, time.perf_counter() - start)
    from bitsmith.export.qdq import deployable

    plain, fallbacks = deployable(model)
    return Deployment(backend, plain, fallbacks, time.perf_counter() - start)


def deploy(
    model: nn.Module,
    example: Tensor | dict[str, Tensor],
    backend: str = "auto",
    out: str | Path | None = None,
    num_threads: int | None = None,
) -> Deployment:
    """``model`` (compressed by bitsmith) on ``backend``; ``out`` keeps the ONNX file (else a temp dir)."""
    installed = available_backends()
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose auto or one of {', '.join(BACKENDS)}")
    if backend != "auto" and backend not in installed:
        raise ValueError(f"backend {backend!r} is not installed here; pip install 'bitsmith[deploy]'")
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="bitsmith-deploy-"))
    if backend != "auto":
        return _build(model, example, backend, folder, num_threads)
    candidates = [name for name in installed if name != "torch"] or ["torch"]
    built = [_build(model, example, name, folder, num_threads) for name in candidates]
    timings = {d.backend: measure_latency(d.model, example, runs=3, num_threads=num_threads) for d in built}
    best = min(built, key=lambda d: timings[d.backend])
    timings["float"] = measure_latency(strip(copy.deepcopy(model)).eval(), example, runs=3, num_threads=num_threads)
    if timings[best.backend] > timings["float"]:
        warnings.warn(f"auto: the fastest integer backend here, {best.backend} ({timings[best.backend]:.1f} ms), is "
                      f"slower than the model in float ({timings['float']:.1f} ms) on this input and CPU; it is kept "
                      "for its smaller file, but for speed run the float model", stacklevel=2)  # fmt: skip
    best.timings = timings
    return best


def outputs(model: Any, example: Any) -> Tensor:
    """The model's output tensor on ``example``; for an HF encoder the hidden states of the real
    (not padding) tokens ``(tokens, dim)``."""
    with torch.no_grad():
        out = run_forward(model, example)
    if isinstance(out, Tensor):
        return out
    hidden = out.last_hidden_state
    mask = example.get("attention_mask") if isinstance(example, dict) else None
    return hidden if mask is None else hidden[mask.bool()]


def agreement(deployed: Any, reference: nn.Module, example: Any) -> float:
    """Cosine between the deployed and the reference model's outputs on ``example`` (all values)."""
    a, b = outputs(deployed, example).flatten().float(), outputs(reference.eval(), example).flatten().float()
    return float(nn.functional.cosine_similarity(a, b, dim=0))
