"""Int8 attention (quality side): both attention matmuls are what an int8 GEMM with int32 accumulation computes."""

from __future__ import annotations

import pytest
import torch

from bitsmith.quant.attention import enable_int8_attention, int8_attention_forward, symmetric_codes
from conftest import EXACT_W_BITS, bert_batch, make_bert


def integer_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """The same attention from integer codes, int64 matmuls and one rescale per product (an int8 kernel's view)."""
    q, qs = symmetric_codes(query, -1)
    k, ks = symmetric_codes(key, -1)
    v, vs = symmetric_codes(value, -2)
    scores = (q.long() @ k.long().transpose(2, 3)).double() * (qs * ks.transpose(2, 3)).double() * scaling
    p = (torch.softmax(scores.float(), -1) * 255).round().long()
    return ((p @ v.long()).double() * (vs.double() / 255)).float().transpose(1, 2)


def test_both_matmuls_are_integer_gemms_with_factored_scales() -> None:
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 3, 7, 8, generator=gen) * s for s in (1.0, 2.0, 0.5))
    out, probs = int8_attention_forward(torch.nn.Identity(), query, key, value, None, scaling=8**-0.5)
    assert torch.allclose(out, integer_attention(query, key, value, 8**-0.5), atol=1e-5)
    assert torch.allclose(probs * 255, (probs * 255).round(), atol=1e-4)  # P on the 1/255 grid
    exact = torch.nn.functional.scaled_dot_product_attention(query, key, value).transpose(1, 2)
    assert 0 < (out - exact).abs().max() < 0.05  # quantized, and close


def test_a_bert_switched_to_int8_attention_stays_close_and_masks_padding() -> None:
    pytest.importorskip("transformers")
    model, batch = make_bert(), bert_batch(3, 12, 0)
    batch["attention_mask"][0, -4:] = 0  # padding: must not change the real tokens' outputs
    with torch.no_grad():
        exact = model(**batch).last_hidden_state
        enable_int8_attention(model)
        out = model(**batch).last_hidden_state
        alone = model(input_ids=batch["input_ids"][:1, :8]).last_hidden_state[0]  # the padded row, unpadded
    real = batch["attention_mask"].bool()
    cosine = torch.nn.functional.cosine_similarity(out[real], exact[real], dim=-1)
    assert not torch.equal(out, exact) and cosine.min() > 0.99
    assert (out[0, :8] - alone).abs().max() < 1e-3  # the padding is masked (ignoring it: 6e-3 here)
    with pytest.raises(ValueError, match="not a Hugging Face model"):
        enable_int8_attention(torch.nn.Linear(2, 2))


def test_ptq_option_switches_attention_and_checkpoints_and_onnx_keep_it(tmp_path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    from bitsmith import build_method, compress, load, save
    from bitsmith.export.onnx import OnnxRuntimeModel, export_onnx

    encoder = {"include": ["encoder.*"]}
    calib, probe = [bert_batch(8, 12, 1)], bert_batch(3, 10, 5)
    outputs = []
    for switched in (False, True):
        model = make_bert()
        ptq = {"name": "ptq", "w_bits": EXACT_W_BITS, "where": encoder, "int8_attention": switched}
        compress(model, build_method(ptq), calib)
        with torch.no_grad():
            outputs.append(model(**probe).last_hidden_state)
    assert not torch.equal(*outputs)  # the option changes the attention
    path = save(model, tmp_path / "int8-attention.safetensors")
    reloaded = load(path, make_bert(seed=1))
    with torch.no_grad():
        assert torch.equal(reloaded(**probe).last_hidden_state, outputs[1])  # the switch is made again on load
    info = export_onnx(model, probe, tmp_path / "model.onnx")
    exported = OnnxRuntimeModel(info["path"], threads=1)(**probe).last_hidden_state
    error = [(exported - out).abs().max() for out in outputs]
    assert error[1] < 2e-3 and error[1] < error[0] / 5  # the deployed graph computes the int8 grids
