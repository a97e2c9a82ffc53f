"""Real low-bit LLM speed on this CPU, all rows in one run: SmolLM2-135M FP32 and bfloat16, W4 weight-only
(bitsmith RTN W4 g64 codes on PyTorch's packed int4 CPU kernel, ``bitsmith.export.int4_cpu``) and W8A8
(torchao ``Int8DynamicActivationInt8WeightConfig``: int8 weights, per-token dynamic int8 activations).

Prefill: one forward of 512 tokens (median of 5 after a warm-up). Decode: batch 1, greedy, 128 new tokens
with the KV cache after a 16-token prompt (median of 3). Perplexity on the first 8 Persuasion windows checks
each deployed model. Timed rows run alone: run nothing else meanwhile (the load average is recorded).
Writes docs/results/llm_speed.{json,md}; ``--write-only`` rewrites the page.
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
import sys
import time
import warnings
from typing import Any

import torch
from common import RESULTS

from bitsmith.eval.latency import load_averages
from bitsmith.eval.lm import language_model_task, perplexity
from bitsmith.files import atomic_write_text

ROWS = RESULTS / "llm_speed.json"
BLOCKS = {"include": ["model.layers.*"]}
PREFILL, NEW_TOKENS, THREADS = 512, 128, 2


@torch.no_grad()
def timed(model: torch.nn.Module, ids: torch.Tensor, prompt: torch.Tensor) -> dict[str, Any]:
    model(input_ids=ids[:, :PREFILL])  # warm-up
    prefill = []
    for _ in range(5):
        start = time.perf_counter()
        model(input_ids=ids[:, :PREFILL])
        prefill.append(time.perf_counter() - start)
    decode = []
    for _ in range(3):
        start = time.perf_counter()
        out = model.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             use_cache=True, pad_token_id=0)  # fmt: skip
        decode.append(time.perf_counter() - start)
        assert out.shape[1] == prompt.shape[1] + NEW_TOKENS
    return {"prefill_tok_s": PREFILL / statistics.median(prefill), "decode_tok_s": NEW_TOKENS / statistics.median(decode),
            "prefill_s": prefill, "decode_s": decode}  # fmt: skip


def variants(model: torch.nn.Module, calib: list) -> list[tuple[str, Any]]:
    def fp32() -> torch.nn.Module:
        return model

    def bf16() -> torch.nn.Module:
        return copy.deepcopy(model).to(torch.bfloat16)

    def int4(head: bool = False) -> torch.nn.Module:
        """RTN W4 g64 blocks on the int4 kernel; with ``head`` also the LM head, untied from the embedding
        (whose lookup stays bfloat16)."""
        from bitsmith import build_method, compress
        from bitsmith.export.int4_cpu import deploy_int4

        quantized = copy.deepcopy(model)
        include = list(BLOCKS["include"])
        if head:
            quantized.lm_head.weight = torch.nn.Parameter(quantized.lm_head.weight.detach().clone())
            quantized.config.tie_word_embeddings = False
            include.append("lm_head")
        compress(quantized, [build_method({"name": "rtn", "bits": 4, "group_size": 64, "where": {"include": include}})])
        return deploy_int4(quantized)[0]

    def w8a8() -> torch.nn.Module:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantized = copy.deepcopy(model)
        quantize_(
            quantized,
            Int8DynamicActivationInt8WeightConfig(),
            filter_fn=lambda m, n: isinstance(m, torch.nn.Linear) and ".layers." in f".{n}",
        )
        return quantized

    return [("FP32", fp32), ("bfloat16", bf16), ("W4 g64 int4 CPU kernel (bf16 activations)", int4),
            ("W4 g64 int4, LM head int4 too (untied)", functools.partial(int4, head=True)),
            ("W8A8 torchao int8 dynamic", w8a8)]  # fmt: skip


def run() -> None:
    from bitsmith.zoo.llm import load_llm

    torch.set_num_threads(THREADS)
    model, tokenizer = load_llm("smollm2")
    task = language_model_task(tokenizer, 8, 1, 1, seed=0)
    ids = task.eval_rows["perplexity"][:1]
    prompt = ids[:, :16]
    rows = []
    for name, build in variants(model, task.calibration):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            deployed = build()
            row = {"name": name, **timed(deployed, ids, prompt)}
            row["perplexity_8_windows"] = perplexity(deployed, task.eval_rows["perplexity"])
        row.update({"threads": THREADS, "load": load_averages()})
        print({k: v for k, v in row.items() if k not in ("prefill_s", "decode_s")}, flush=True)
        rows.append(row)
        del deployed
    atomic_write_text(ROWS, json.dumps(rows, indent=1))
    write(rows)


def write(rows: list[dict[str, Any]]) -> None:
    base = rows[0]
    lines = [
        "# LLM speed on CPU: SmolLM2-135M-Instruct",
        "",
        "Regenerate: `python benchmarks/llm_speed.py` (alone on the machine; `--write-only` rewrites this page).",
        f"Prefill: one forward of {PREFILL} tokens, median of 5. Decode: batch 1, greedy, {NEW_TOKENS} new tokens "
        "with the KV cache after a 16-token prompt, median of 3. All rows in one process, one after another, "
        f"{THREADS} threads. W4 uses bitsmith's RTN W4 g64 codes (the kernel's speed does not depend on how the codes "
        "were found, GPTQ or AWQ deploy the same way) on PyTorch's packed int4 CPU kernel with bfloat16 activations; "
        "W8A8 is torchao's int8 dynamic-activation config on the decoder blocks' Linears. The tied embedding / "
        "`lm_head` stays float (bfloat16 in the int4 row), except in the row that unties it: there the head is RTN "
        "W4 g64 on the int4 kernel too (the embedding lookup stays bfloat16; its perplexity shows the head's cost).",
        "",
        "| row | prefill tok/s | x FP32 | decode tok/s | x FP32 | ppl (8 Persuasion windows) | load (1 min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / base['prefill_tok_s']:.2f} | "
            f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f} | "
            f"{r['perplexity_8_windows']:.2f} | {r['load'][0]:.2f} |"
        )
    (RESULTS / "llm_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if "--write-only" in sys.argv:
        write(json.loads(ROWS.read_text()))
    else:
        run()
