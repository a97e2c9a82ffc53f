"""Int8 attention's effect on quality (issue: faster than the peers' own flows): all-MiniLM-L6-v2 with both
attention matmuls on 8-bit grids (``bitsmith.quant.attention``: per-token query / key scales, per-channel value
scales, probabilities on the 1/255 grid, softmax in float), alone and on top of the W8A8 SmoothQuant model of
``speed.py``; fake-quant, so no kernel is timed here. Quality: cosine of mean-pooled embeddings to FP32 and
recall@1 on the docstring pairs (the protocol of ``speed.md``).

Regenerate: ``python benchmarks/int8_attention.py`` (accuracy rows: may share the machine; rows resume in
``int8-attention.json``); writes ``docs/results/int8-attention.md``.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from common import RESULTS, Rows, load
from speed import bitsmith_model

from bitsmith.files import atomic_write_text
from bitsmith.quant.attention import enable_int8_attention

ROWS = {
    "FP32": lambda base, task: base,
    "FP32 + int8 attention": lambda base, task: enable_int8_attention(copy.deepcopy(base)),
    "W8A8 SmoothQuant (the speed benchmark's model)": lambda base, task: bitsmith_model("minilm", base, task),
    "W8A8 SmoothQuant + int8 attention": lambda base, task: enable_int8_attention(bitsmith_model("minilm", base, task)),
}


def run() -> None:
    rows = Rows(RESULTS / "int8-attention.json")
    base, task = load("minilm")
    task.evaluate(base)  # the FP32 embeddings: the cosine reference
    for name, build in ROWS.items():
        if not rows.done(row=name):
            rows.add({"row": name, **task.evaluate(build(base, task))})
            print(rows.rows[-1], flush=True)
    write(rows.rows)


def write(rows: list[dict[str, Any]]) -> None:
    doc = (__doc__ or "").split("\n\n")
    lines = ["# Int8 attention: quality on all-MiniLM-L6-v2 (fake-quant)", "", doc[0].replace("\n", " "), "",
             doc[1].replace("\n", " "), "", "| row | cosine to FP32 | R@1 % |", "|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['row']} | {r['cosine']:.4f} | {100 * r['retrieval']:.2f} |")
    atomic_write_text(RESULTS / "int8-attention.md", "\n".join([*lines, ""]))


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-only"]:
        write(Rows(RESULTS / "int8-attention.json").rows)
    else:
        run()
