"""ONNX QDQ export: ONNX Runtime computes what bitsmith's fake-quant model computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bitsmith import compress
from bitsmith.methods.ptq.noisyquant import NoisyQuant
from bitsmith.methods.ptq.ptq import PTQ
from bitsmith.methods.ptq.rtn import RTN
from bitsmith.methods.ptq.smoothquant import SmoothQuant
from conftest import EXACT_W_BITS, bert_batch, make_bert, make_cnn, make_vit
from test_noisyquant import make_model, tokens

pytest.importorskip("onnxruntime")
from bitsmith.export.onnx import OnnxRuntimeModel, export_onnx  # noqa: E402


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def exported(model: nn.Module, example: torch.Tensor, tmp_path: Path) -> OnnxRuntimeModel:
    export_onnx(model, example, tmp_path / "model.onnx")
    return OnnxRuntimeModel(tmp_path / "model.onnx", threads=1)


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 6)])
def test_qdq_cnn_in_onnx_runtime_matches_the_fake_quant_model(
    w_bits: int, a_bits: int, calib: list, images: torch.Tensor, tmp_path: Path
) -> None:
    model = make_cnn()
    compress(model, PTQ(w_bits=w_bits, a_bits=a_bits), calib)
    runtime = exported(model, images, tmp_path)
    onnx = pytest.importorskip("onnx")
    stored = onnx.load(str(tmp_path / "model.onnx")).graph.initializer
    eight_bit = sum(np.prod(i.dims) for i in stored if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
    floats = sum(np.prod(i.dims) for i in stored if i.data_type == onnx.TensorProto.FLOAT)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert eight_bit >= weights > floats  # the weights are stored as 8-bit codes, not floats
    bigger = torch.cat([images, images.flip(0), images]).contiguous()  # the batch dimension is dynamic
    with torch.no_grad():
        assert cosine(runtime(bigger), model(bigger)) > 0.9999
        assert torch.equal(runtime(bigger).argmax(1), model(bigger).argmax(1))


def test_qdq_vit_in_onnx_runtime_matches(images: torch.Tensor, calib: list, tmp_path: Path) -> None:
    model = make_vit()  # without VNNI, 8-bit weights saturate ONNX Runtime's int16 pair sums (cosine 0.989 here)
    compress(model, PTQ(w_bits=EXACT_W_BITS, a_bits=8), calib)
    with torch.no_grad():
        assert cosine(exported(model, images, tmp_path)(images), model(images)) > 0.9999


def test_smoothquant_scales_and_noisyquant_noise_are_exported(tmp_path: Path) -> None:
    model, x = make_model(pre_norm=False), tokens()  # post-LN: one smoothing stays a runtime division
    calib = [tokens(32, seed=s) for s in (2, 3)]
    compress(model, [SmoothQuant(), PTQ(w_bits=6, a_bits=6, a_symmetric=True), NoisyQuant(grid=8, rows=256)], calib)
    noisy = [m for m in model.modules() if getattr(getattr(m, "input_q", None), "noise", None) is not None]
    assert noisy and any(float(m.input_q.noise.abs().sum()) > 0 for m in noisy)
    with torch.no_grad():
        assert cosine(exported(model, x, tmp_path)(x), model(x)) > 0.9999


def test_layers_onnx_cannot_express_fall_back_to_float_with_a_warning(calib: list, images, tmp_path: Path) -> None:
    model = make_cnn()
    compress(model, RTN(bits=4, group_size=8, where={"include": ["fc1"]}), calib)
    with pytest.warns(UserWarning, match="fc1 .*not uniform per-tensor / per-channel"):
        info = export_onnx(model, images, tmp_path / "model.onnx")
    assert list(info["fallbacks"]) == ["fc1"]
    with torch.no_grad():
        assert cosine(OnnxRuntimeModel(info["path"])(images), model(images)) > 0.9999  # weight-only: exact


def test_hf_encoder_exports_with_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    model = make_bert(layers=2, vocab=50, seed=None)

    def batch(size: int, length: int, seed: int) -> dict[str, torch.Tensor]:
        return bert_batch(size, length, seed, vocab=50)

    compress(model, PTQ(w_bits=8, a_bits=8, where={"exclude": ["pooler*"]}), [batch(8, 12, s) for s in (1, 2)])
    runtime = exported(model, batch(2, 12, 3), tmp_path)
    longer = batch(5, 20, 4)  # another batch size and sequence length than the export example
    with torch.no_grad():
        expected = model(**longer).last_hidden_state
        assert cosine(runtime(**longer).last_hidden_state, expected) > 0.999


def test_quantized_embeddings_are_stored_as_8_bit_rows_and_exported(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    onnx = pytest.importorskip("onnx")
    model, example = make_bert(layers=1, vocab=500, seed=None), bert_batch(4, 10, seed=0, vocab=500)
    where = {"types": ["Linear", "Embedding"], "exclude": ["pooler*"]}
    compress(model, PTQ(w_bits=8, a_bits=8, where=where), [example])
    table = model.embeddings.word_embeddings
    assert type(table).__name__ == "QEmbedding" and table.input_q is None
    codes = table.effective_weight() / table.weight_q.scale.reshape(-1, 1)  # per-row 8-bit grid
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127.5
    runtime = exported(model, example, tmp_path)
    stored = onnx.load(str(tmp_path / "model.onnx")).graph.initializer
    assert any(i.data_type == onnx.TensorProto.INT8 and list(i.dims) == [500, 32] for i in stored)
    with torch.no_grad():
        expected = model(**example).last_hidden_state
    assert cosine(runtime(**example).last_hidden_state, expected) > 0.999
