"""Peers on the same SmolLM2 rows as ``benchmarks/llm.py`` (same model, text, windows and calibration):
llm-compressor's GPTQ (run in ``.venv-peers``, which pins its own transformers; its compressed-tensors output is
decompressed with the library and evaluated here) and torchao's int4 weight-only quantizer, both its default
(tinygemm) parameters and its HQQ option. Rows go to docs/results/llm.json and resume.

torchao 0.18 builds its int4 weights only for CUDA kernels (tinygemm, mslk) and has no CPU int4 layout, so the
torchao rows use torchao's own quantization primitives on CPU (``_choose_qparams_affine_tinygemm``,
``_choose_qparams_and_quantize_affine_hqq``, the tinygemm quantize / dequantize) on bfloat16 weights, as its
config does, and evaluate the dequantized weights in FP32: the quality of torchao int4, not its speed.
Sizes of peer rows are those of bitsmith's packing of the same bits and groups (the RTN row's).
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import Rows, peer_run
from llm import BLOCKS, MODEL, ROWS, Entry, fill, reference, write
from torch import nn

from bitsmith.eval.lm import LanguageModelTask
from bitsmith.sequential import peak_rss, reset_peak_rss

PEERS_PY = Path(".venv-peers/bin/python")
LLMCOMPRESSOR = [(4, 64), (3, 64), (4, 32)]
TORCHAO = [64, 32]


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    prefix = BLOCKS["include"][0].rstrip("*")
    return {n: m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear)}


@torch.no_grad()
def torchao_int4(weight: torch.Tensor, group: int, hqq: bool) -> torch.Tensor:
    """``weight`` through torchao's int4 weight-only quantizer (bfloat16, asymmetric 0..15, float zero)."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _choose_qparams_and_quantize_affine_hqq,
        _dequantize_affine_tinygemm,
        _quantize_affine_tinygemm,
    )

    w = weight.to(torch.bfloat16)
    block = (1, group)
    if hqq:
        codes, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
            w, nbits=4, group_size=group, axis=1, compute_dtype=torch.bfloat16, device="cpu"
        )
        codes = codes.to(torch.int32)
    else:
        scale, zero = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, block, torch.int32, 0, 15,
                                                      scale_dtype=w.dtype, zero_point_dtype=w.dtype)  # fmt: skip
        codes = _quantize_affine_tinygemm(w, block, scale, zero, torch.int32, 0, 15)
    out = _dequantize_affine_tinygemm(codes, block, scale, zero, torch.int32, 0, 15, output_dtype=torch.bfloat16)
    return out.float().reshape(weight.shape)


def evaluate_with(model: nn.Module, task: LanguageModelTask, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The task's metrics and samples with the named Linear weights replaced (then restored)."""
    layers = block_linears(model)
    saved = {n: layers[n].weight.detach().clone() for n in weights}
    try:
        with torch.no_grad():
            for n, w in weights.items():
                layers[n].weight.copy_(w)
        return {**task.evaluate(model), "samples": task.samples(model)}
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                layers[n].weight.copy_(w)


def llmcompressor_weights(model_dir: Path, task: LanguageModelTask, bits: int, group: int) -> tuple[dict, dict]:
    """llm-compressor GPTQ in its own venv on the task's calibration windows: decompressed weights, timing."""
    from bitsmith.export.compressed_tensors import read_compressed_tensors

    script = "benchmarks/peers/llmcompressor_gptq.py"
    with peer_run(PEERS_PY, script, model_dir, task, str(bits), str(group)) as (folder, timing):
        return read_compressed_tensors(folder), timing


def configurations() -> list[tuple[str, dict[str, Any]]]:
    out = [(f"llm-compressor GPTQ W{b} g{g}", {"method": "llmcompressor-gptq", "bits": b, "group": g})
           for b, g in LLMCOMPRESSOR]  # fmt: skip
    for group in TORCHAO:
        out.append((f"torchao int4 weight-only g{group}", {"method": "torchao-int4", "bits": 4, "group": group}))
        out.append((f"torchao int4 HQQ g{group}", {"method": "torchao-int4-hqq", "bits": 4, "group": group}))
    return out


def peer_row(model: nn.Module, task: LanguageModelTask, rows: Rows, key: dict[str, Any]) -> dict[str, Any]:
    """One peer's quantized weights, timed, scored; sizes from bitsmith's RTN row of the same bits and group."""
    from bitsmith.zoo.llm import llm_dir

    same = [r for r in rows.rows if (r["method"], r["bits"], r["group"]) == ("rtn", key["bits"], key["group"])]
    if not same:
        raise ValueError(f"no RTN W{key['bits']} g{key['group']} row to take the size from: run benchmarks/llm.py")
    if key["method"] == "llmcompressor-gptq":
        weights, timing = llmcompressor_weights(llm_dir(MODEL), task, key["bits"], key["group"])
        seconds, extra = timing["seconds"], timing["calib_extra_bytes"]
    else:
        reset_peak_rss()
        before, start = peak_rss(), time.perf_counter()
        hqq = key["method"].endswith("hqq")
        weights = {n: torchao_int4(m.weight.detach(), key["group"], hqq) for n, m in block_linears(model).items()}
        seconds, extra = time.perf_counter() - start, peak_rss() - before
    return {**evaluate_with(model, task, weights), "quant_seconds": round(seconds, 1),
            "calib_extra_mib": round(extra / 2**20), "size_mib": same[0]["size_mib"],
            "avg_weight_bits": same[0]["avg_weight_bits"], "threads": 2}  # fmt: skip


def run() -> None:
    model, task = reference(MODEL)
    rows = Rows(ROWS)
    entries: list[Entry] = [(label, key, {"methods": []}, functools.partial(peer_row, model, task, rows, key))
                            for label, key in configurations()]  # fmt: skip
    fill(rows, entries, write)


if __name__ == "__main__":
    sys.exit(run())
