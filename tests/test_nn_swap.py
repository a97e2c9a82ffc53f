"""Compressed modules, selection, swap and strip: on plain torch models and Hugging Face models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsmith import LowRankConv2d, LowRankLinear, QConv2d, QLinear, Selection, build_method, compress, strip, swap
from bitsmith.nn import compressed_layers, rebuild
from bitsmith.quant import UniformQuantizer
from conftest import make_cnn


def _to_q(name: str, module: nn.Module, overrides: dict) -> nn.Module:
    return QConv2d.from_float(module) if isinstance(module, nn.Conv2d) else QLinear.from_float(module)


def test_quantized_modules_without_quantizers_are_bit_identical(cnn: nn.Module, images: torch.Tensor) -> None:
    reference = cnn(images)
    specs = swap(cnn, None, _to_q)
    assert list(specs) == ["stem", "conv", "fc1", "fc2"]
    assert isinstance(cnn.stem, QConv2d) and isinstance(cnn.fc1, QLinear)
    assert torch.equal(cnn(images), reference)


def test_swap_shares_parameters(cnn: nn.Module) -> None:
    weight = cnn.fc1.weight
    swap(cnn, {"include": "fc1"}, _to_q)
    assert cnn.fc1.weight is weight


def test_selection_globs_regex_types_first_last(cnn: nn.Module) -> None:
    assert list(Selection(include=["fc*"]).resolve(cnn)) == ["fc1", "fc2"]
    assert list(Selection(include=["re:(stem|fc2)"]).resolve(cnn)) == ["stem", "fc2"]
    assert list(Selection(types=["Conv2d"]).resolve(cnn)) == ["stem", "conv"]
    assert list(Selection(exclude=["@first", "@last"]).resolve(cnn)) == ["conv", "fc1"]
    overrides = Selection(overrides={"@first": {"w_bits": 8}, "fc*": {"a_bits": 6}}).resolve(cnn)
    assert overrides == {"stem": {"w_bits": 8}, "conv": {}, "fc1": {"a_bits": 6}, "fc2": {"a_bits": 6}}


def test_selection_errors_name_the_problem(cnn: nn.Module) -> None:
    with pytest.raises(ValueError, match="matched no layers"):
        Selection(include=["nothing*"]).resolve(cnn)
    with pytest.raises(ValueError, match="override pattern 'fx'"):
        Selection(overrides={"fx": {"w_bits": 4}}).resolve(cnn)
    with pytest.raises(ValueError, match="unknown field"):
        build_method({"name": "ptq", "where": {"overrides": {"fc1": {"wbits": 4}}}})


def test_per_layer_overrides_reach_the_quantizers(cnn: nn.Module, calib: list) -> None:
    method = build_method(
        {"name": "ptq", "w_bits": 4, "where": {"overrides": {"@first": {"w_bits": 8, "a_bits": None}}}}
    )
    compress(cnn, method, calib)
    assert cnn.stem.weight_q.bits == 8 and cnn.stem.input_q is None
    assert cnn.conv.weight_q.bits == 4 and cnn.conv.input_q.bits == 8


def test_strip_gives_plain_modules_with_the_same_outputs(cnn: nn.Module, images: torch.Tensor, calib: list) -> None:
    compress(cnn, build_method({"name": "ptq", "w_bits": 4, "a_bits": None}), calib)
    quantized = cnn(images)
    cnn.fc1.set_mask(cnn.fc1.weight.abs() > 0.05)
    masked = cnn(images)
    assert not torch.equal(masked, quantized)
    strip(cnn)
    assert type(cnn.stem) is nn.Conv2d and type(cnn.fc1) is nn.Linear
    assert torch.allclose(cnn(images), masked, atol=1e-6)
    assert float((cnn.fc1.weight == 0).float().mean()) > 0.3


def test_mask_zeros_weights_before_quantization(cnn: nn.Module) -> None:
    layer = QLinear.from_float(cnn.fc1, weight_q=UniformQuantizer(4, symmetric=False))
    layer.set_mask(torch.rand_like(layer.weight) > 0.5)
    layer.weight_q.calibrate_(layer.weight * layer.mask)
    assert bool((layer.effective_weight()[~layer.mask] == 0).all())
    with pytest.raises(ValueError, match="mask shape"):
        layer.set_mask(torch.ones(3, 3))


def test_low_rank_full_rank_is_exact_and_truncation_is_optimal() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(12, 8)
    x = torch.randn(5, 12)
    full = LowRankLinear.from_float(linear, rank=8)
    assert torch.allclose(full(x), linear(x), atol=1e-5)
    low = LowRankLinear.from_float(linear, rank=3)
    s = torch.linalg.svdvals(linear.weight)
    err = torch.linalg.matrix_norm(low.merged().weight - linear.weight)
    assert torch.allclose(err, s[3:].norm(), atol=1e-5)  # Eckart-Young
    assert isinstance(low.to_float(), nn.Sequential)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(12, 8, rank=9)


def test_low_rank_conv() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 9, 9)
    layer = LowRankConv2d.from_float(conv, rank=6)
    assert torch.allclose(layer(x), conv(x), atol=1e-5)
    assert torch.allclose(layer.merged()(x), conv(x), atol=1e-5)
    assert torch.allclose(
        LowRankConv2d.from_float(conv, rank=2).to_float()(x), LowRankConv2d.from_float(conv, rank=2)(x)
    )


def test_rebuild_from_spec_map_gives_identical_model(images: torch.Tensor, calib: list) -> None:
    model = make_cnn()
    compress(model, build_method({"name": "ptq", "w_bits": 3, "w_granularity": "group", "w_group_size": 8}), calib)
    swap(model, {"include": "fc1"}, lambda n, m, o: LowRankLinear.from_float(m, 16))
    layers = compressed_layers(model)
    twin = rebuild(make_cnn(), layers)
    twin.load_state_dict(model.state_dict())
    assert compressed_layers(twin) == layers
    assert torch.equal(twin(images), model(images))


@pytest.fixture(scope="module")
def hf_models() -> dict[str, tuple[nn.Module, dict]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
    )
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2))
    vit = transformers.ViTModel(transformers.ViTConfig(
        image_size=16, patch_size=8, num_channels=1, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64))  # fmt: skip
    ids = {"input_ids": torch.randint(0, 50, (2, 7))}
    return {
        "bert": (bert.eval(), ids),
        "gpt2": (gpt.eval(), ids),
        "vit": (vit.eval(), {"pixel_values": torch.randn(2, 1, 16, 16)}),
    }


def _output(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.mark.parametrize("family, layers", [("bert", 13), ("gpt2", 8), ("vit", 14)])
def test_hugging_face_models_quantize_and_strip(hf_models: dict, family: str, layers: int) -> None:
    model, batch = hf_models[family]
    model = __import__("copy").deepcopy(model)
    reference = _output(model, batch)
    specs = compress(
        model, build_method({"name": "ptq", "w_bits": 8, "a_bits": 8, "where": {"exclude": ["*lm_head*"]}}), [batch]
    )
    assert len(specs) == layers  # 2 blocks x (q, k, v, attn out, fc1, fc2); GPT-2 fuses qkv; + poolers, ViT patch conv
    quantized = _output(model, batch)
    assert torch.nn.functional.cosine_similarity(quantized.flatten(), reference.flatten(), dim=0) > 0.99
    strip(model)
    assert not compressed_layers(model)
