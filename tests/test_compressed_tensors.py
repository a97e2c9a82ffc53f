"""compressed-tensors export (the format vLLM reads): the library decompresses every layer back to bitsmith's
quantized weights, mixed precision included; transformers reloads what it can load with identical logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitsmith import build_method, compress
from conftest import make_llama, token_batches

pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

from bitsmith.export.compressed_tensors import read_compressed_tensors, save_compressed_tensors  # noqa: E402

BLOCKS = {"include": ["model.layers.*"]}


def decompressed(out: Path) -> tuple[QuantizationConfig, dict[str, torch.Tensor]]:
    """The saved config and every quantized layer's weight as the compressed-tensors library decompresses it."""
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    return config, read_compressed_tensors(out)


def quantized_weights(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {n: model.get_submodule(n).weight_q(model.get_submodule(n).weight) for n in names}


def logits_after_reload(out: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()(input_ids=ids).logits


def test_mixed_precision_gptq_decompresses_to_the_same_weights_layer_by_layer(tmp_path: Path) -> None:
    """Asymmetric W4/W2 g32 (packed int32 codes and zero points): one config group per width, and the
    library's decompression equals bitsmith's weights exactly (a wrong zero-point shift fails it)."""
    model = make_llama()
    overrides = {"model.layers.1.mlp.*": {"bits": 2}}
    entry = {"name": "gptq", "bits": 4, "group_size": 32, "where": {**BLOCKS, "overrides": overrides}}
    compress(model, [build_method(entry)], token_batches())
    config, weights = decompressed(save_compressed_tensors(model, None, tmp_path / "ct"))
    bits = sorted(scheme.weights.num_bits for scheme in config.config_groups.values())
    assert bits == [2, 4] and config.format == "pack-quantized" and len(weights) == 14
    for name, weight in quantized_weights(model, list(weights)).items():
        assert torch.equal(weights[name], weight), name


def test_symmetric_w4_reloads_through_transformers_with_identical_logits(tmp_path: Path) -> None:
    model = make_llama()
    calib = token_batches()
    compress(
        model, [build_method({"name": "rtn", "bits": 4, "group_size": 32, "symmetric": True, "where": BLOCKS})], calib
    )
    out = save_compressed_tensors(model, None, tmp_path / "ct")
    ids = calib[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(logits_after_reload(out, ids), model(input_ids=ids).logits)


def test_smoothquant_w8a8_is_int_quantized_with_dynamic_per_token_activations(tmp_path: Path) -> None:
    """int8 weights per channel, dynamic per-token int8 inputs: transformers (compressed-tensors quantizes the
    activations on the fly) gives bitsmith's logits exactly with asymmetric per-token activations."""
    model = make_llama()
    calib = token_batches()
    ptq = {"name": "ptq", "w_bits": 8, "a_bits": 8, "a_granularity": "token", "a_dynamic": True,
           "a_symmetric": False, "where": BLOCKS}  # fmt: skip
    compress(model, [build_method({"name": "smoothquant", "where": BLOCKS}), build_method(ptq)], calib)
    out = save_compressed_tensors(model, None, tmp_path / "ct")
    config, weights = decompressed(out)
    (scheme,) = config.config_groups.values()
    assert scheme.format == "int-quantized" and scheme.input_activations.dynamic
    assert scheme.input_activations.strategy == "token"
    for name, weight in quantized_weights(model, list(weights)).items():
        assert torch.equal(weights[name], weight), name
    ids = calib[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(logits_after_reload(out, ids), model(input_ids=ids).logits)


def test_what_compressed_tensors_cannot_hold_is_refused_with_the_reason(tmp_path: Path) -> None:
    model = make_llama()
    compress(model, [build_method({"name": "rtn", "bits": 4, "group_size": 32, "float_zero": True, "where": BLOCKS})],
             token_batches())  # fmt: skip
    with pytest.raises(ValueError, match="float zero point"):
        save_compressed_tensors(model, None, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    static = make_llama()
    compress(static, [build_method({"name": "ptq", "w_bits": 8, "a_bits": 8, "where": BLOCKS})], token_batches())
    with pytest.raises(ValueError, match="dynamic per-token"):
        save_compressed_tensors(static, None, tmp_path / "ct")
