"""The language-model task: perplexity on real prose, KL divergence and top-1 agreement of next-token
distributions with the FP32 model, and greedy generations side by side with FP32.

Text is cut into non-overlapping windows of ``window`` tokens (the tokenizer's BOS first when it adds one,
then text); each window scores its ``window - 1`` next-token predictions, so the scored-token count is
``windows * (window - 1)``. Calibration windows come from *Emma* and *Mansfield Park*; evaluation reads
*Persuasion* (``perplexity``) and the Python library reference (``perplexity_docs``), texts the calibration
never sees.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitsmith.method import eval_mode, output_logits
from bitsmith.progress import duration, log

CALIB_NOVELS = ("emma", "mansfieldpark")
PROMPTS = (
    "It is a truth universally acknowledged, that",
    "The quickest way to sort a list in Python is",
    "Anne Elliot walked along the shore at Lyme and",
)


def token_stream(tokenizer: Any, text: str) -> Tensor:
    """The token ids of ``text`` without special tokens, as one 1-D tensor."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_id(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer puts one before text by default (Gemma), else None (SmolLM2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    return bos if bos is not None and ids and ids[0] == bos else None


def windows(stream: Tensor, window: int, count: int | None, bos: int | None, starts: list[int] | None = None) -> Tensor:
    """``(count, window)`` non-overlapping windows of ``stream`` from its start (or at ``starts``), each
    with ``bos`` first when given; refuses a stream shorter than one window, with the numbers."""
    body = window - (bos is not None)
    available = stream.numel() // body
    if available < 1:
        raise ValueError(f"the text has {stream.numel()} tokens, fewer than one window of {body}; "
                         "give more text or a smaller window")  # fmt: skip
    if starts is None:
        count = available if count is None else min(count, available)
        starts = [i * body for i in range(count)]
    rows = torch.stack([stream[s : s + body] for s in starts])
    if bos is not None:
        rows = torch.cat([torch.full((rows.shape[0], 1), bos, dtype=torch.long), rows], dim=1)
    return rows


def random_windows(stream: Tensor, window: int, count: int, bos: int | None, seed: int) -> Tensor:
    """``count`` windows at random distinct offsets (fixed ``seed``), as GPTQ samples its calibration text."""
    body = window - (bos is not None)
    if stream.numel() < body:
        return windows(stream, window, count, bos)  # raises with the numbers
    rng = random.Random(seed)
    starts = sorted(rng.randrange(0, stream.numel() - body + 1) for _ in range(count))
    return windows(stream, window, None, bos, starts)


def logits_of(model: nn.Module, ids: Tensor) -> Tensor:
    """``(batch, tokens, vocab)`` float32 next-token logits."""
    return output_logits(model(input_ids=ids)).float()


@torch.no_grad()
def score(
    model: nn.Module, rows: Tensor, reference: nn.Module | None = None, compared: int = 0, what: str = "text"
) -> dict[str, float]:
    """``perplexity``: ``exp`` of the mean next-token negative log-likelihood over every scored token of
    ``rows``. With a ``reference``, its first ``compared`` rows also give ``kl``, the mean KL(P_ref || P_model)
    per token (nats), and ``top1_agreement``, from the same forward passes of ``model``. Progress is logged
    about ten times (``what`` names the text)."""
    nll, scored, kl, agree, positions = 0.0, 0, 0.0, 0, 0
    count, started, every = rows.shape[0], time.perf_counter(), max(1, rows.shape[0] // 10)
    with eval_mode(model):
        for index, row in enumerate(rows.split(1)):
            if index and index % every == 0:
                log.info(f"scoring {what}: window {index}/{count}, {duration(time.perf_counter() - started)} elapsed")
            logits = logits_of(model, row)[0]
            nll += float(F.cross_entropy(logits[:-1], row[0, 1:], reduction="sum"))
            scored += row.shape[1] - 1
            if reference is None or index >= compared:
                continue
            with eval_mode(reference):
                ref = F.log_softmax(logits_of(reference, row)[0], dim=-1)
            out = F.log_softmax(logits, dim=-1)
            kl += float(F.kl_div(out, ref, log_target=True, reduction="sum"))
            agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
            positions += row.shape[1]
    result = {"perplexity": math.exp(nll / scored)}
    if positions:
        result.update(kl=kl / positions, top1_agreement=agree / positions)
    return result


def perplexity(model: nn.Module, rows: Tensor) -> float:
    return score(model, rows)["perplexity"]


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: tuple[str, ...], new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts`` (``new_tokens`` each), without the prompt."""
    texts = []
    with eval_mode(model):
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            for _ in range(new_tokens):  # no KV cache: a few dozen tokens, and any compressed model works
                ids = torch.cat([ids, logits_of(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
            texts.append(tokenizer.decode(ids[0, -new_tokens:], skip_special_tokens=True))
    return texts


@dataclass
class LanguageModelTask:
    """Perplexity on two held-out texts, KL / top-1 agreement with FP32 on ``kl_windows`` windows of the
    first, and greedy generations. The first model evaluated is kept (a copy) as the FP32 reference."""

    tokenizer: Any
    eval_rows: dict[str, Tensor]  # metric name -> (windows, window) token ids
    calibration: list[dict[str, Tensor]]
    kl_windows: int = 16
    new_tokens: int = 24
    prompts: tuple[str, ...] = PROMPTS
    reference: nn.Module | None = field(default=None, repr=False)
    reference_samples: list[str] | None = field(default=None, repr=False)
    kind: str = "language-model"

    @property
    def eval_examples(self) -> int:
        """Scored tokens over all evaluation texts."""
        return sum(rows.shape[0] * (rows.shape[1] - 1) for rows in self.eval_rows.values())

    @property
    def calib_examples(self) -> int:
        return sum(batch["input_ids"].shape[0] for batch in self.calibration)

    def example(self, batch_size: int) -> dict[str, Tensor]:
        rows = next(iter(self.eval_rows.values()))
        return {"input_ids": rows[:1].expand(batch_size, -1).clone()}

    def first(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {key: value[:1] for key, value in batch.items()}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.reference is None:  # the first model evaluated is the FP32 reference
            self.reference = copy.deepcopy(model).eval()
        out: dict[str, float] = {}
        for index, (name, rows) in enumerate(self.eval_rows.items()):  # KL / agreement on the first text
            scores = score(model, rows, self.reference if index == 0 else None, self.kl_windows, name)
            out[name] = scores.pop("perplexity")
            out.update(scores)
        return out

    def samples(self, model: nn.Module) -> list[dict[str, str]]:
        """Greedy generations of the fixed prompts by ``model`` and by FP32, side by side."""
        if self.reference_samples is None:
            self.reference_samples = generate(self.reference or model, self.tokenizer, self.prompts, self.new_tokens)
        texts = generate(model, self.tokenizer, self.prompts, self.new_tokens)
        return [{"prompt": p, "fp32": r, "compressed": t}
                for p, r, t in zip(self.prompts, self.reference_samples, texts, strict=True)]  # fmt: skip


def language_model_task(
    tokenizer: Any,
    eval_windows: int | None,
    calib_windows: int,
    calib_batch_size: int,
    seed: int,
    window: int = 512,
    kl_windows: int = 16,
    docs_share: float = 0.0,
) -> LanguageModelTask:
    """Calibration: ``calib_windows`` random windows of *Emma* + *Mansfield Park*, of which a ``docs_share`` come
    from the Python library reference instead (drawn after the text the evaluation reads, never overlapping it);
    evaluation: the first ``eval_windows`` windows of *Persuasion* and of the Python library reference (all when
    None)."""
    from bitsmith.zoo.prose import austen_novels, python_docs

    novels = austen_novels()
    bos = bos_id(tokenizer)
    docs = token_stream(tokenizer, python_docs())
    eval_rows = {
        "perplexity": windows(token_stream(tokenizer, novels["persuasion"]), window, eval_windows, bos),
        "perplexity_docs": windows(docs, window, eval_windows, bos),
    }
    from_docs = round(calib_windows * docs_share)
    calib_stream = token_stream(tokenizer, "\n\n".join(novels[name] for name in CALIB_NOVELS))
    calib = random_windows(calib_stream, window, calib_windows - from_docs, bos, seed)
    if from_docs:
        held_out = docs[eval_rows["perplexity_docs"].shape[0] * (window - (bos is not None)) :]
        if held_out.numel() < window:
            raise ValueError(f"calib_docs_share: the evaluation reads all {docs.numel()} tokens of the Python docs, "
                             "so none are left to calibrate on; set eval_size or a share of 0")  # fmt: skip
        calib = torch.cat([calib, random_windows(held_out, window, from_docs, bos, seed)])
        calib = calib[torch.randperm(calib.shape[0], generator=torch.Generator().manual_seed(seed))]
    batches = [{"input_ids": part} for part in calib.split(calib_batch_size)]
    return LanguageModelTask(tokenizer, eval_rows, batches, kl_windows=kl_windows)


def text_language_model_task(
    tokenizer: Any,
    text: str,
    eval_windows: int | None,
    calib_windows: int,
    calib_batch_size: int,
    seed: int,
    eval_share: float = 0.1,
    window: int = 512,
    kl_windows: int = 16,
) -> LanguageModelTask:
    """A user's own text (``data.path``): the last ``eval_share`` of its tokens are evaluated (perplexity, and KL /
    agreement with FP32), the first part gives ``calib_windows`` random calibration windows; they never overlap."""
    bos = bos_id(tokenizer)
    stream = token_stream(tokenizer, text)
    cut = int(stream.numel() * (1 - eval_share))
    try:
        eval_rows = {"perplexity_own": windows(stream[cut:], window, eval_windows, bos)}
        calib = random_windows(stream[:cut], window, calib_windows, bos, seed)
    except ValueError as exc:
        raise ValueError(f"data.path: {exc} (the text is split {1 - eval_share:.0%} calibration / "
                         f"{eval_share:.0%} evaluation by data.eval_share)") from None  # fmt: skip
    batches = [{"input_ids": part} for part in calib.split(calib_batch_size)]
    return LanguageModelTask(tokenizer, eval_rows, batches, kl_windows=kl_windows)
