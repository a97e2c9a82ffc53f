"""bitsmith's grouped weights written as llama.cpp blocks (Q8_0, Q4_0, Q4_1) and read back with the ``gguf``
package's de-quantization: the codes bitsmith chose, byte-exact, with only the scales rounded to fp16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # the `llm` extra

from bitsmith.export.gguf_blocks import check_round_trip, gguf_type, pack, unpack  # noqa: E402
from bitsmith.quant.uniform import UniformQuantizer  # noqa: E402
from test_recipe_cli import needs_llm  # noqa: E402

CASES = [(8, True, False, 32, "Q8_0"), (4, True, False, 32, "Q4_0"), (4, True, False, 128, "Q4_0"),
         (4, False, False, 64, "Q4_1"), (4, False, True, 32, "Q4_1"), (5, True, False, 32, "Q5_0"),
         (5, False, True, 64, "Q5_1")]  # fmt: skip


def weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(48, 256, generator=g) * 0.05 + 0.01 * torch.randn(48, 1, generator=g)


@pytest.mark.parametrize(("bits", "symmetric", "float_zero", "group", "kind"), CASES)
def test_the_file_holds_bitsmiths_codes_with_fp16_scales(bits: int, symmetric: bool, float_zero: bool, group: int,
                                                          kind: str) -> None:  # fmt: skip
    """llama.cpp's de-quantization of the written blocks equals bitsmith's codes times its fp16-rounded scales
    (exactly for the symmetric types), and stays within the fp16 bound of the model as optimised."""
    w = weight()
    q = UniformQuantizer(bits, symmetric, "group", group_size=group, float_zero=float_zero).calibrate_(w)
    tensor = pack("layer", q, w)
    assert tensor.qtype == gguf.GGMLQuantizationType[kind]
    enc = q.encode(w)
    scale16 = enc.params["scale"].to(torch.float16).float().repeat_interleave(group).reshape(w.shape)
    if symmetric:
        assert torch.equal(unpack(tensor), enc.codes.float() * scale16)
    else:
        zero = enc.params["zero_point"].repeat_interleave(group).reshape(w.shape)
        assert torch.allclose(unpack(tensor), (enc.codes.float() - zero) * scale16, atol=2e-3 * float(w.abs().max()))
    assert check_round_trip("layer", q, w, tensor) < 2e-3


def test_a_damaged_block_fails_the_round_trip_check() -> None:
    w = weight()
    q = UniformQuantizer(4, True, "group", group_size=32).calibrate_(w)
    tensor = pack("layer", q, w)
    tensor.data[3, 5] ^= 0x11  # two codes of one block changed
    with pytest.raises(ValueError, match="layer 'layer' written as Q4_0 differs from bitsmith's weight"):
        check_round_trip("layer", q, w, tensor)


@pytest.mark.parametrize(("bits", "symmetric", "granularity", "group"),
                         [(3, True, "group", 64), (4, True, "channel", None), (4, True, "group", 48), (2, False, "group", 32)])  # fmt: skip
def test_a_grid_no_gguf_type_holds_is_refused_by_name(bits: int, symmetric: bool, granularity: str,
                                                      group: int | None) -> None:  # fmt: skip
    q = UniformQuantizer(bits, symmetric, granularity, group_size=group)
    with pytest.raises(ValueError, match=r"gguf: layer 'model.layers.0.mlp.up_proj' has a .* grid, which no GGUF block "
                                         r"type holds; the grids that map: symmetric 8-bit -> Q8_0"):  # fmt: skip
        gguf_type("model.layers.0.mlp.up_proj", q)


def test_a_tiny_llamas_tensors_read_back_as_bitsmiths_weights() -> None:
    """Every tensor of a compressed Llama goes to its GGUF name; quantized ones read back (blocks de-quantized,
    q / k rows put back in Hugging Face's order) within the fp16 bound of bitsmith's weights, floats exactly."""
    from bitsmith import build_method, compress
    from bitsmith.export.gguf_file import _heads, gguf_tensors, read_weight
    from conftest import make_llama

    model = make_llama()
    compress(model, [build_method({"name": "rtn", "bits": 4, "group_size": 32, "symmetric": True,
                                   "where": {"include": ["model.layers.*"]}})], [])  # fmt: skip
    tensors = gguf_tensors(model)
    assert "blk.0.attn_q.weight" in tensors and "token_embd.weight" in tensors
    modules = dict(model.named_modules())
    for _, (hf_name, value) in tensors.items():
        owner = modules[hf_name.rpartition(".")[0]]
        back = read_weight(value, _heads(model.config, hf_name))
        if isinstance(value, np.ndarray):
            assert torch.equal(back, model.state_dict()[hf_name])
        else:
            ours = owner.weight_q(owner.weight).detach()
            assert (back - ours).abs().max() <= 2e-3 * ours.abs().max(), hf_name


@pytest.mark.parametrize("float_type", ["f16", "q8_0"])
def test_the_embedding_is_written_in_the_float_type_asked(float_type: str) -> None:
    """``f16``: the table in half precision; ``q8_0``: llama.cpp's own Q8_0 rounding of it (its quantize tool's
    choice for a tied embedding); norms stay float32 either way."""
    from bitsmith.export.gguf_file import gguf_tensors
    from conftest import make_llama

    model = make_llama()
    table = model.get_input_embeddings().weight.detach()
    _, value = gguf_tensors(model, float_type)["token_embd.weight"]
    if float_type == "f16":
        assert value.dtype == np.float16 and torch.equal(torch.from_numpy(value), table.half())
    else:
        assert value.qtype == gguf.GGMLQuantizationType.Q8_0
        step = table.abs().amax(1, keepdim=True) / 127  # bounds each block's d; error <= d/2 + fp16(d)
        assert (unpack(value) - table).abs().le(0.6 * step).all() and not torch.equal(unpack(value), table)  # + fp16 d
    assert gguf_tensors(model, float_type)["output_norm.weight"][1].dtype == np.float32
    with pytest.raises(ValueError, match="float type 'bf8'; choose one of f32, f16, q8_0"):
        gguf_tensors(model, "bf8")


def test_an_input_quantized_layer_is_refused_by_name() -> None:
    from bitsmith import build_method, compress
    from bitsmith.export.gguf_file import gguf_tensors
    from conftest import make_llama, token_batches

    model = make_llama()
    compress(model, [build_method({"name": "ptq", "w_bits": 8, "a_bits": 8, "w_granularity": "group",
                                   "w_group_size": 32, "where": {"include": ["model.layers.*"]}})], token_batches())  # fmt: skip
    with pytest.raises(ValueError, match="gguf: layer 'model.layers.0.self_attn.q_proj' is compressed in a way GGUF"):
        gguf_tensors(model)


@needs_llm
def test_smollm2_written_as_q4_0_loads_in_transformers_with_bitsmiths_logits(tmp_path) -> None:  # noqa: ANN001
    """The whole file: SmolLM2 with RTN on the Q4_0 grid, its metadata and tokenizer from the zoo GGUF, read by
    transformers' own GGUF loader (which de-quantizes the blocks and undoes the q / k permutation): the same
    next-token choices and logits within the fp16 scale rounding."""
    from transformers import AutoModelForCausalLM

    from bitsmith import build_method, compress
    from bitsmith.export.gguf_file import write_gguf
    from bitsmith.zoo.llm import gguf_path, load_llm

    model, tokenizer = load_llm("smollm2")
    compress(model, [build_method({"name": "rtn", "bits": 4, "group_size": 32, "symmetric": True,
                                   "where": {"include": ["model.layers.*"]}})], [])  # fmt: skip
    out = write_gguf(model, gguf_path("smollm2"), tmp_path / "smollm2-q4_0.gguf")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, trust_remote_code=False,
                                                local_files_only=True).eval()  # fmt: skip
    ids = tokenizer("It is a truth universally acknowledged, that a single man", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, back(input_ids=ids).logits
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert (ours - theirs).abs().max() < 5e-3 * ours.abs().max()


@needs_llm
def test_a_recipe_with_export_gguf_publishes_model_gguf_in_the_run(tmp_path) -> None:  # noqa: ANN001
    """`export.gguf: true` on the SmolLM2 RTN recipe (asymmetric 4-bit, groups of 64): model.gguf is in the run
    folder and its manifest, its block layers are Q4_1, and the file reads back."""
    import json

    from bitsmith.cli import main

    out = tmp_path / "run"
    assert main(["run", "recipes/smollm2-rtn-w4g64.yaml", "--out", str(out), "--smoke", "export.gguf=true"]) == 0
    assert "model.gguf" in json.loads((out / "manifest.json").read_text())["files"]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["token_embd.weight"] == "F32"
    # later, from the run's checkpoint: `bitsmith export RUN --gguf` writes the same bytes
    assert main(["export", str(out), "--gguf", "--out", str(tmp_path / "again.gguf")]) == 0
    assert (tmp_path / "again.gguf").read_bytes() == (out / "model.gguf").read_bytes()


def test_bitsmith_export_gguf_refuses_a_checkpoint_of_another_model(tmp_path, capsys) -> None:  # noqa: ANN001
    from bitsmith import save
    from bitsmith.cli import main
    from conftest import make_llama

    save(make_llama(), tmp_path / "model.safetensors", meta={"model": "cnn"})
    assert main(["export", str(tmp_path), "--gguf"]) != 0
    assert "--gguf needs a checkpoint of a zoo LLM with the llama architecture (smollm2)" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--gguf"]) != 0
    assert "no checkpoint there" in capsys.readouterr().err


def test_export_gguf_is_refused_for_a_model_without_a_gguf_source(tmp_path) -> None:  # noqa: ANN001
    from bitsmith.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="export.gguf: a GGUF file takes its architecture and tokenizer"):
        load_recipe("recipes/cnn-ptq-w8a8.yaml", ["export.gguf=true"])
