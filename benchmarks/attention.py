"""Cheaper attention and fewer tokens (issue 41): how sparse each layer's attention is on real inputs, the zoo ViT on
Fashion-MNIST test images and all-MiniLM-L6-v2 on the docstring sentences (bitsmith.eval.attention); FAR's rows
(far_rows.py), token pruning's (token_rows.py) and SQAP's (sqap_rows.py). Writes docs/results/attention.{json,md,png}; rows resume. Time the FAR models (``--only latency``) on
an otherwise idle machine, after their rows.

Usage: python benchmarks/attention.py [--only TEXT] [--write-only]
"""

from __future__ import annotations

import functools
from typing import Any

import far_rows
import sparse_teacher_rows
import sqap_rows
import token_rows
from common import RESULTS, load, save_figure
from llm import Entry, run_rows

from bitsmith.eval.attention import attention_sparsity

ROWS = RESULTS / "attention.json"
TOP_K = {"vit": 4, "minilm": 4}


def sparsity_row(name: str) -> dict[str, Any]:
    model, task = load(name)
    batches = list(task.calibration)
    return {"layers": attention_sparsity(model, batches, TOP_K[name]), "batches": len(batches), "top_k": TOP_K[name]}


def entries() -> list[Entry]:
    out: list[Entry] = [(f"attention sparsity: {name}", {"section": "sparsity", "model": name}, {},
                         functools.partial(sparsity_row, name)) for name in ("vit", "minilm")]  # fmt: skip
    out += [(f"far vit: {label}", {"section": "far", "model": "vit", "variant": label}, {},
             functools.partial(far_rows.vit_row, label)) for label in far_rows.VIT_CONFIGS]  # fmt: skip
    out += [(f"far minilm: {label}", {"section": "far", "model": "minilm", "variant": label}, {},
             functools.partial(far_rows.minilm_row, label)) for label in far_rows.MINILM_CONFIGS]  # fmt: skip
    out += [(f"tokens: {label}", {"section": "tokens", "model": "vit", "variant": label}, {},
             functools.partial(token_rows.row, label)) for label in token_rows.CONFIGS]  # fmt: skip

    def latency() -> dict[str, Any]:  # the cached models as they are when it runs
        return far_rows.latency_row(token_rows.cached_models())

    out += [(f"sqap: {label}", {"section": "sqap", "model": "vit", "variant": label}, {},
             functools.partial(sqap_rows.row, label)) for label in sqap_rows.CONFIGS]  # fmt: skip
    out += [(f"sqap: {label}", {"section": "sqap-minilm", "model": "minilm", "variant": label}, {},
             functools.partial(sqap_rows.minilm_row, label)) for label in sqap_rows.MINILM_CONFIGS]  # fmt: skip
    out.append(("sqap latency", {"section": "sqap-latency"}, {}, sqap_rows.latency_row))
    out += [(f"sparse teacher: keep {keep}", {"section": "sparse-teacher", "model": "vit", "variant": f"keep {keep}"}, {},
             functools.partial(sparse_teacher_rows.row, keep)) for keep in sparse_teacher_rows.RETAIN]  # fmt: skip
    return [*out, ("far and token latency", {"section": "far-latency"}, {}, latency)]


def write(rows: list[dict[str, Any]]) -> None:
    done = [r for r in rows if r.get("section") == "sparsity" and "error" not in r]
    lines = ["# Attention: sparsity, cheaper attention, fewer tokens", "",
             "Regenerate: `make bench-attention` (`python benchmarks/attention.py`; rows resume).", "",
             "## How sparse is each layer's attention", "",
             "Normalised entropy of each query's attention over the keys (1: uniform, 0: one key) and the mass held by "
             "the top keys, averaged over heads, queries and inputs: the zoo ViT (50 tokens: a class token and 49 "
             "patches) on its calibration images (Fashion-MNIST training images), all-MiniLM-L6-v2 on its calibration "
             "docstring sentences (padding included in the keys' count).", "",
             "| model | layer | entropy | top-k mass | k |", "|---|---|---|---|---|"]  # fmt: skip
    for r in done:
        for layer, s in r["layers"].items():
            lines.append(f"| {r['model']} | {layer} | {s['entropy']:.3f} | {s['top_mass']:.3f} | {r['top_k']} |")
    lines += ["", "![attention sparsity per layer](attention.png)", ""]
    lines += far_rows.page(rows) + token_rows.page(rows) + sqap_rows.page(rows)
    lines += sparse_teacher_rows.page(rows)
    (RESULTS / "attention.md").write_text("\n".join(lines))
    plot(done)


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for r in rows:
        values = list(r["layers"].values())
        axes[0].plot(range(len(values)), [v["entropy"] for v in values], marker="o", label=r["model"])
        axes[1].plot(range(len(values)), [v["top_mass"] for v in values], marker="o", label=r["model"])
    for ax, title in zip(axes, ("normalised entropy", "top-k mass"), strict=True):
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, "attention.png")


if __name__ == "__main__":
    run_rows(__doc__, ROWS, lambda args: entries(), write)
