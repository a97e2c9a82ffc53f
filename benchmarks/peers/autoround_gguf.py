"""AutoRound's GGUF export (PyPI ``auto-round``, its own venv ``.venv-autoround``) on a Hugging Face causal-LM
directory, calibrated on the given token windows (the same ones bitsmith and llama.cpp's imatrix use). Writes the
GGUF file AutoRound makes and ``timing.json`` (seconds) under OUT.

    .venv-autoround/bin/python benchmarks/peers/autoround_gguf.py MODEL_DIR CALIB.safetensors OUT FORMAT ITERS
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(model_dir: str, calib: str, out: str, scheme: str, iters: int) -> None:
    import torch
    from auto_round import AutoRound
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 1)
    ids = load_file(calib)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = list(ids.split(8))  # AutoRound's default batch size; a list of token tensors is its own dataloader
    start = time.perf_counter()
    rounder = AutoRound(model, tokenizer, scheme=scheme, dataset=batches, iters=iters, nsamples=ids.shape[0],
                        seqlen=ids.shape[1], batch_size=8, device_map="cpu")  # fmt: skip
    rounder.quantize_and_save(out, format=scheme)
    seconds = time.perf_counter() - start
    (Path(out) / "timing.json").write_text(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
