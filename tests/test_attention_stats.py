"""Attention sparsity: entropy and top-k mass of known distributions, the zoo ViT's recomputed probabilities are
the ones its fused kernel uses, and sharper attention reads as sparser."""

from __future__ import annotations

import pytest
import torch

from bitsmith.eval.attention import attention_sparsity, entropy_and_top_mass, vit_attention_probs
from conftest import make_vit


def test_uniform_attention_has_entropy_one_and_one_hot_attention_zero() -> None:
    uniform = torch.full((2, 3, 5, 8), 1 / 8)
    assert entropy_and_top_mass(uniform, 2) == pytest.approx((1.0, 0.25))
    one_hot = torch.nn.functional.one_hot(torch.randint(0, 8, (2, 3, 5)), 8).float()
    assert entropy_and_top_mass(one_hot, 1) == pytest.approx((0.0, 1.0), abs=1e-6)
    with pytest.raises(ValueError, match="top_k 9: choose 1..8"):
        entropy_and_top_mass(uniform, 9)


def test_the_recomputed_vit_probabilities_are_the_fused_kernels() -> None:
    attention = make_vit().blocks[0].attn
    x = torch.randn(2, 10, 16)
    probs = vit_attention_probs(attention, x)
    b, n, _ = x.shape
    v = attention.qkv(x)[..., -attention.heads * attention.v_dim :].reshape(b, n, attention.heads, -1).transpose(1, 2)
    expected = attention.proj((probs @ v).transpose(1, 2).reshape(b, n, -1))
    torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-5)


def test_sharper_attention_reads_as_sparser() -> None:
    model, images = make_vit(), torch.rand(8, 1, 12, 12)
    plain = attention_sparsity(model, [images], top_k=2)
    assert list(plain) == ["blocks.0.attn", "blocks.1.attn"]
    for block in model.blocks:
        block.attn.scale *= 30.0  # logits 30x larger: each query's softmax concentrates on its best keys
    sharp = attention_sparsity(model, [images], top_k=2)
    for name in plain:
        assert sharp[name]["entropy"] < plain[name]["entropy"] and sharp[name]["top_mass"] > plain[name]["top_mass"]


def test_a_hugging_face_encoder_reports_its_own_attention_per_layer() -> None:
    pytest.importorskip("transformers")
    from conftest import bert_batch, make_bert

    stats = attention_sparsity(make_bert(layers=2), [bert_batch(4, 10, seed=0)], top_k=3)
    assert list(stats) == ["layer.0", "layer.1"]
    assert all(0 < s["entropy"] <= 1 and 0 < s["top_mass"] <= 1 for s in stats.values())
