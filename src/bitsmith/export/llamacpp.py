"""llama.cpp as a backend for GGUF files: the same language-model metrics as PyTorch (a GGUF file answers like a
causal LM module), llama.cpp's own quantizers and importance matrix (its ``llama-quantize`` / ``llama-imatrix``
tools), and prefill / decode speed.

Installed by ``make install-llamacpp``: llama-cpp-python (the extra ``llamacpp``) compiled from its source
distribution, which vendors llama.cpp, with the tools built in the same CMake build; the build folder stays in
bitsmith's cache (``llama.cpp-VERSION``; ``BITSMITH_LLAMACPP_BUILD`` names another). ``python -m
bitsmith.export.llamacpp --check`` says what is there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bitsmith.export.gguf_check import validate_gguf

VERSION = "0.3.36"  # llama-cpp-python, pinned in pyproject's `llamacpp` extra and the Makefile
TOOLS = ("llama-quantize", "llama-imatrix")
BUILD_HINT = (f"run `make install-llamacpp` (compiles llama-cpp-python {VERSION} and llama.cpp's tools once, "
              "about 5 minutes on 2 cores)")  # fmt: skip


def build_dir() -> Path:
    from bitsmith.zoo import cache_dir

    return Path(os.environ.get("BITSMITH_LLAMACPP_BUILD") or cache_dir() / f"llama.cpp-{VERSION}")


def tool(name: str) -> Path:
    """The path of llama.cpp's tool ``name`` in the cached build, or one line saying how to build it."""
    root = build_dir()
    found = [root / "bin" / name, *sorted(root.glob(f"**/bin/{name}"))] if root.is_dir() else []
    for path in found:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(f"llama.cpp's {name} is not built in {root}: {BUILD_HINT}")


def binding() -> Any:
    """The ``llama_cpp`` module, or one line saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise FileNotFoundError(f"llama-cpp-python is not installed: {BUILD_HINT}") from None
    return llama_cpp


def _run(command: list[str], what: str) -> float:
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"llama.cpp {what} failed ({done.returncode}): {' | '.join(tail)[:400]}")
    return time.perf_counter() - began


def quantize(source: Path, out: Path, qtype: str, imatrix: Path | None = None, threads: int = 2) -> float:
    """llama.cpp's own quantization of ``source`` (an F32 / F16 GGUF) to ``qtype`` (e.g. ``Q4_K_M``), with an
    importance matrix when given; returns the seconds it took."""
    validate_gguf(source)
    command = [str(tool("llama-quantize")), *(["--imatrix", str(imatrix)] if imatrix else [])]
    return _run([*command, str(source), str(out), qtype, str(threads)], f"quantize to {qtype}")


def importance_matrix(model: Path, text: Path, out: Path, chunks: int, context: int = 512, threads: int = 2) -> float:
    """llama.cpp's importance matrix of ``model`` on the first ``chunks`` windows of ``context`` tokens of
    ``text`` (a UTF-8 file); returns the seconds it took."""
    command = [str(tool("llama-imatrix")), "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(context),
               "--chunks", str(chunks), "-t", str(threads), "--no-ppl"]  # fmt: skip
    return _run(command, "imatrix")


class GgufLanguageModel(nn.Module):
    """A GGUF file run by llama.cpp that answers ``forward(input_ids)`` with next-token logits, like a causal LM
    module: ``bitsmith.eval.lm.score`` and the language-model task evaluate it unchanged (token ids are shared:
    the zoo's tokenizer is the GGUF's)."""

    def __init__(self, path: Path, context: int = 512, threads: int = 2) -> None:
        super().__init__()
        self.path, self.context = Path(path), context
        validate_gguf(self.path)  # a damaged or hostile file is one line here, not a crash inside llama.cpp
        self.llm = binding().Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context,
                                   logits_all=True, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)  # fmt: skip

    def close(self) -> None:
        """Free llama.cpp's model now (not at interpreter exit, where the binding's finaliser can fail)."""
        self.llm.close()

    def forward(self, input_ids: Tensor, **_: Any) -> SimpleNamespace:
        rows = []
        for row in input_ids.tolist():
            if len(row) > self.context:
                raise ValueError(f"{self.path.name}: {len(row)} tokens exceed the context of {self.context}")
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(row)], dtype=np.float32)))
        return SimpleNamespace(logits=torch.stack(rows))


class SpeedTimer:
    """One GGUF file loaded for timing: prefill seconds (``prefill`` tokens in one batch) and greedy decode seconds
    (``new_tokens`` after a 17-token prompt, batch 1) on ``threads`` threads."""

    def __init__(self, path: Path, prefill: int = 512, new_tokens: int = 128, threads: int = 2) -> None:
        validate_gguf(path)
        self.prefill_tokens, self.new_tokens = prefill, new_tokens
        self.llm = binding().Llama(model_path=str(path), n_ctx=prefill + new_tokens + 32, n_batch=prefill,
                                   n_ubatch=prefill, logits_all=False, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)  # fmt: skip

    def warm_up(self, prompt: list[int]) -> None:
        if len(prompt) < self.prefill_tokens:
            raise ValueError(f"speed: the prompt has {len(prompt)} tokens, fewer than the {self.prefill_tokens} "
                             "to prefill")  # fmt: skip
        self.llm.eval(prompt[:16])  # the first call maps the weights

    def prefill(self, prompt: list[int]) -> float:
        self.llm.reset()
        began = time.perf_counter()
        self.llm.eval(prompt[: self.prefill_tokens])
        return time.perf_counter() - began

    def decode(self, prompt: list[int]) -> float:
        self.llm.reset()
        self.llm.eval(prompt[:17])
        began = time.perf_counter()
        for _ in range(self.new_tokens):
            self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
        return time.perf_counter() - began

    def close(self) -> None:
        self.llm.close()


def speed(path: Path, prompt: list[int], prefill: int = 512, new_tokens: int = 128, threads: int = 2,
          runs: int = 3) -> dict[str, float]:  # fmt: skip
    """Prefill and greedy decode tokens/s of one file (``SpeedTimer``): the median of ``runs``."""
    timer = SpeedTimer(path, prefill, new_tokens, threads)
    try:
        timer.warm_up(prompt)
        prefills = [timer.prefill(prompt) for _ in range(runs)]
        decodes = [timer.decode(prompt) for _ in range(runs)]
    finally:
        timer.close()
    return {"prefill_tokens_per_s": prefill / float(np.median(prefills)),
            "decode_tokens_per_s": new_tokens / float(np.median(decodes))}  # fmt: skip


def paired_speed(first: Path, second: Path, prompt: list[int], rounds: int = 10, threads: int = 2,
                 new_tokens: int = 128) -> dict[str, float]:  # fmt: skip
    """Decode tokens/s of two files timed in alternation (ABBA order, both loaded), so that a machine's drift
    touches both alike: each file's median, and the median over rounds of first / second."""
    timers = [SpeedTimer(path, new_tokens=new_tokens, threads=threads) for path in (first, second)]
    try:
        for timer in timers:
            timer.warm_up(prompt)
        seconds: list[list[float]] = [[], []]
        for round_ in range(rounds):
            for which in (0, 1) if round_ % 2 == 0 else (1, 0):
                seconds[which].append(timers[which].decode(prompt))
    finally:
        for timer in timers:
            timer.close()
    ratios = [b / a for a, b in zip(*seconds, strict=True)]  # tokens/s of first over second
    return {"first_decode_tokens_per_s": new_tokens / float(np.median(seconds[0])),
            "second_decode_tokens_per_s": new_tokens / float(np.median(seconds[1])),
            "decode_ratio": float(np.median(ratios)), "decode_ratio_min": min(ratios),
            "decode_ratio_max": max(ratios), "rounds": rounds}  # fmt: skip


def check() -> list[str]:
    """What is installed: the binding's version and each tool's path (raises with the fix when one is missing)."""
    module = binding()
    found = getattr(module, "__version__", "?")
    if found != VERSION:
        raise FileNotFoundError(f"llama-cpp-python {found} is installed, bitsmith pins {VERSION}: {BUILD_HINT}")
    return [f"llama-cpp-python {found}", *(f"{name}: {tool(name)}" for name in TOOLS)]


if __name__ == "__main__":
    if sys.argv[1:] != ["--check"]:
        sys.exit("usage: python -m bitsmith.export.llamacpp --check")
    try:
        print("\n".join(check()))
    except FileNotFoundError as exc:
        sys.exit(str(exc))
