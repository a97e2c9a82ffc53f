"""The second architecture: Gemma 3 270M (optional, `make install-gemma`, Gemma Terms of Use) through the same
task and methods as ``benchmarks/llm.py``: FP32, RTN / GPTQ / AWQ at W4 and W3 with groups of 128 (Gemma's
widths are multiples of 128). Same text, windows and calibration. Writes docs/results/llm_gemma3.{json,md};
rows resume; ``--write-only`` rewrites the page.

The reference is de-quantized from a Q4_K_M GGUF file (4-bit K-quants, super-blocks of 256 with 6-bit
sub-block scales, some tensors at 6 bits): its weights lie on grids bitsmith's uniform groups do not
reproduce exactly, so there is no lossless row.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

from common import RESULTS, Rows
from llm import CALIB_WINDOWS, EVAL_WINDOWS, KL_WINDOWS, Entry, fill, measure, recipe, reference

MODEL = "gemma3"
ROWS = RESULTS / "llm_gemma3.json"
GROUP = 128


def configurations() -> list[tuple[str, list[dict[str, Any]], dict[str, Any]]]:
    out: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
        ("FP32", [], {"method": "fp32", "bits": 32, "group": 0})
    ]
    for bits in (4, 3):
        for method in ("rtn", "gptq", "awq"):
            out.append((f"{method.upper()} W{bits} g{GROUP}", recipe(method, bits, GROUP),
                        {"method": method, "bits": bits, "group": GROUP}))  # fmt: skip
    return out


def run() -> None:
    model, task = reference(MODEL)
    entries: list[Entry] = [(label, key, {"methods": methods}, functools.partial(measure, model, task, methods))
                            for label, methods, key in configurations()]  # fmt: skip
    fill(Rows(ROWS), entries, write)


def write(rows: list[dict[str, Any]]) -> None:
    lines = [
        "# LLM weight quantization: Gemma 3 270M (second architecture)",
        "",
        "Regenerate: `python benchmarks/llm_gemma.py` (needs `make install-gemma`; rows resume). Same protocol as "
        f"[llm.md](llm.md): perplexity on the first {EVAL_WINDOWS} windows of 512 Gemma tokens of *Persuasion* and "
        f"of the Python library docs, KL and top-1 agreement on the first {KL_WINDOWS}, calibration on "
        f"{CALIB_WINDOWS} windows of *Emma* and *Mansfield Park*. Only the 18 decoder blocks' Linears are "
        "quantized (the 262k-token embedding, tied to the head, stays FP32: most of the model's size). "
        "The reference comes from a Q4_K_M GGUF file, so its weights already lie on 4- and 6-bit K-quant grids.",
        "",
        "| row | ppl Persuasion | ppl Python docs | KL to FP32 | top-1 agree % | size MiB | quant s | calib peak +MiB | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['perplexity']:.2f} | {r['perplexity_docs']:.2f} | {r['kl']:.4f} | "
            f"{100 * r['top1_agreement']:.1f} | {r['size_mib']:.1f} | {r['quant_seconds']:.1f} | "
            f"{r['calib_extra_mib']} | {r.get('load', [0])[0]:.1f} |"
        )
    (RESULTS / "llm_gemma3.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if "--write-only" in sys.argv:
        write(json.loads(ROWS.read_text()))
    else:
        run()
