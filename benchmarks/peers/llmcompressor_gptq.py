"""llm-compressor's GPTQ on a Hugging Face causal-LM directory, run in the peers' venv (``.venv-peers``: it
pins another transformers). Writes a compressed-tensors directory and ``timing.json`` (seconds, peak RSS).

    .venv-peers/bin/python benchmarks/peers/llmcompressor_gptq.py MODEL_DIR CALIB.safetensors OUT BITS GROUP
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main(model_dir: str, calib: str, out: str, bits: int, group: int) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    ids = load_file(calib)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group" if group else "channel",
               "group_size": group or None, "actorder": "static"}  # fmt: skip
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                          dampening_frac=0.01, block_size=128)  # fmt: skip
    rss_before = peak_rss()
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0])  # fmt: skip
    seconds = time.perf_counter() - start
    extra = peak_rss() - rss_before
    model.save_pretrained(out, save_compressed=True)
    (Path(out) / "timing.json").write_text(json.dumps({"seconds": seconds, "calib_extra_bytes": extra}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
