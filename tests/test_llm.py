"""The LLM base on tiny random decoders: GPTQ's error compensation, AWQ's scale search and folding, the
sequential runner, the Hugging Face round trip, the text readers and the loader's errors."""

from __future__ import annotations

import copy
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from bitsmith import build_method, compress
from bitsmith.eval.lm import windows
from bitsmith.methods.llm.awq import search_scales
from bitsmith.methods.llm.gptq import gptq_quantize
from bitsmith.nn import QLinear
from bitsmith.sequential import sequential
from bitsmith.topology import topology_of
from bitsmith.zoo.llm import check_gguf
from bitsmith.zoo.prose import _record, rst_prose
from conftest import make_llama, token_batches
from test_recipe_cli import needs_llm

BLOCKS = {"include": ["model.layers.*"]}


def correlated_inputs(n: int = 512, d: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g)
    return base @ torch.randn(8, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)


def rtn(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    from bitsmith.quant.uniform import UniformQuantizer

    return UniformQuantizer(bits, False, "group", group_size=group).calibrate_(weight)(weight)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_compensates_the_rounding_error_through_the_hessian(act_order: bool) -> None:
    """On correlated inputs GPTQ's output error ||X (W - Q)^T|| is far below round-to-nearest's at the same grid
    (it fails if the error feedback to later columns is removed), and its values lie on that grid."""
    x = correlated_inputs()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    hessian = 2 * x.T @ x / x.shape[0]
    q, params = gptq_quantize(weight, hessian, 3, 16, False, 0.01, act_order, 16)
    error_gptq = (x @ (weight - q).T).pow(2).mean()
    error_rtn = (x @ (weight - rtn(weight, 3, 16)).T).pow(2).mean()
    assert error_gptq < 0.5 * error_rtn
    codes = q.view(32, 4, 16) / params.scale[..., None] + params.zero[..., None]
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the group grid
    assert codes.round().min() >= 0 and codes.round().max() <= 7


def test_gptq_block_sees_the_quantized_blocks_before_it() -> None:
    """The sequential runner feeds block 1 the output of the *quantized* block 0 (not the float one)."""
    model = make_llama()
    calib = token_batches()
    seen: list[torch.Tensor] = []
    float_model = copy.deepcopy(model)
    blocks = topology_of(model).blocks(model)

    def record(name: str, block: nn.Module, inputs, topology) -> None:
        if name.endswith(".1"):
            seen.extend(inputs.hidden)
        else:
            with torch.no_grad():
                for p in block.parameters():
                    p.mul_(0.5)  # "compress" block 0 visibly

    sequential(model, calib, record)
    captured = []
    handle = (
        topology_of(float_model).blocks(float_model)[1][1].register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    )
    with torch.no_grad():
        float_model(**calib[0])
    handle.remove()
    assert len(seen) == len(calib) and not torch.allclose(seen[0], captured[0])
    assert blocks[0][1] is model.model.layers[0]


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_gptq_and_awq_beat_rtn_on_the_model_output(model_type: str) -> None:
    """Also on Gemma 3, whose blocks alternate sliding-window and global attention (per-block keyword inputs)."""
    model = make_llama(model_type=model_type)
    calib = token_batches(count=4, batch=4, length=32)
    ids = calib[0]["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids).logits

    def error(entry: dict) -> float:
        quantized = copy.deepcopy(model)
        compress(quantized, [build_method({**entry, "bits": 3, "group_size": 32, "where": BLOCKS})], calib)
        with torch.no_grad():
            return float((quantized(input_ids=ids).logits - reference).pow(2).mean())

    base = error({"name": "rtn"})
    assert error({"name": "gptq"}) < base
    assert error({"name": "awq", "n_grid": 10}) < base


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_folding_a_scale_into_the_norm_keeps_the_float_model(model_type: str) -> None:
    """``divide_feeder`` + scaling the weights is an identity in float (Gemma's norm gain is 1 + w)."""
    model = make_llama(model_type=model_type)
    ids = token_batches()[0]["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        topology = topology_of(model)
        block = topology.blocks(model)[0][1]
        for group in topology.block_groups(block):
            scales = torch.rand(block.get_submodule(group.linears[0]).weight.shape[1]) + 0.5
            topology.divide_feeder(block, group, scales)
            for name in group.linears:
                block.get_submodule(name).weight.mul_(scales)
        assert torch.allclose(model(input_ids=ids).logits, reference, atol=1e-4)


def test_awq_search_protects_the_outlier_channel() -> None:
    """With one input channel 30x larger than the rest, the searched ratio is above 0 and its error below
    plain RTN's (ratio 0): the scale search is what AWQ adds."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    layer = QLinear.from_float(linear)
    from bitsmith.quant.layers import uniform_weight_quantizer

    layer.weight_q = uniform_weight_quantizer("l", layer, 3, "group", 32, False, "minmax")
    x = torch.randn(4, 16, 64)
    x[..., 5] *= 30
    block = nn.Module()
    block.add_module("l", layer)
    from bitsmith.topology import Group

    scales, history = search_scales(block, Group("x", ("l",)), [x], None, n_grid=10)
    assert min(history) < history[0] and not torch.allclose(scales, torch.ones_like(scales))
    assert scales[5] == scales.max()


def test_a_saved_hf_directory_reloads_with_identical_logits(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from bitsmith.export.hf import save_hf

    model = make_llama()
    calib = token_batches()
    compress(model, [build_method({"name": "gptq", "bits": 4, "group_size": 32, "where": BLOCKS})], calib)
    out = save_hf(model, None, tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = calib[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, QLinear)


def test_group_sizes_that_do_not_divide_a_layer_are_refused_with_the_numbers() -> None:
    model = make_llama()
    with pytest.raises(ValueError, match="group_size 48 does not divide the 64 inputs of layer"):
        compress(model, [build_method({"name": "gptq", "group_size": 48, "where": BLOCKS})], token_batches())


def test_text_shorter_than_one_window_is_refused_with_the_numbers() -> None:
    with pytest.raises(ValueError, match="the text has 100 tokens, fewer than one window of 511"):
        windows(torch.arange(100), 512, None, bos=1)
    rows = windows(torch.arange(1000), 256, None, bos=None)
    assert rows.shape == (3, 256) and torch.equal(rows[1], torch.arange(256, 512))


def test_rst_prose_keeps_paragraphs_and_drops_code() -> None:
    source = """Title\n=====\n\nThe json module encodes and decodes JSON text easily.\n\nExample::\n\n    import json\n    json.dumps(1)\n\n>>> json.loads('1')\n1\n\n.. function:: dumps(obj)\n\n   Serialize obj.\n\nAfter the code, more prose about the module follows here.\n"""
    prose = rst_prose(source)
    assert "json.dumps(1)" not in prose and "Serialize" not in prose and ">>>" not in prose
    assert "The json module encodes" in prose and "more prose about the module" in prose


def test_a_lazy_load_record_that_lies_about_its_size_is_refused() -> None:
    payload = zlib.compress(b"x" * 1000)
    good = (1000).to_bytes(4, "big") + payload
    assert _record(good, 0, len(good), "t") == b"x" * 1000
    with pytest.raises(ValueError, match="declares"):
        _record((1 << 30).to_bytes(4, "big") + payload, 0, len(good), "t")
    with pytest.raises(ValueError, match="outside"):
        _record(good, 0, len(good) + 10, "t")


def test_bad_gguf_files_are_named_with_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        check_gguf(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_bytes(b"hello world" * 10)
    with pytest.raises(ValueError, match="not a GGUF file"):
        check_gguf(tmp_path / "text.gguf")
    (tmp_path / "short.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ValueError, match="truncated GGUF file"):
        check_gguf(tmp_path / "short.gguf")


def fake_package(site: Path, data: bytes) -> Path:
    """An installed distribution ``fakellm`` whose RECORD holds the SHA-256 of its ``model.gguf``."""
    import base64
    import hashlib

    (site / "fakellm").mkdir(parents=True)
    (site / "fakellm" / "__init__.py").write_text("")
    (site / "fakellm" / "model.gguf").write_bytes(data)
    info = site / "fakellm-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakellm\nVersion: 0.1\n")
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(f"fakellm/__init__.py,,\nfakellm/model.gguf,sha256={digest},{len(data)}\n"
                                 "fakellm-0.1.dist-info/RECORD,,\n")  # fmt: skip
    return site / "fakellm" / "model.gguf"


def test_a_damaged_packaged_model_file_is_refused_before_conversion(tmp_path: Path, monkeypatch) -> None:
    """A GGUF whose bytes differ from the digest the installer recorded (one flipped byte in its tensor data,
    which the format's own checks do not see) is refused in one line that names it and the reinstall."""
    from bitsmith.zoo.package_files import verify_installed

    path = fake_package(tmp_path / "site", b"GGUF" + bytes(range(256)) * 64)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert len(verify_installed(path, "fakellm", "pip install fakellm")) == 64
    data = bytearray(path.read_bytes())
    data[9000] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.gguf: damaged .* reinstall it with --force-reinstall: pip install"):
        verify_installed(path, "fakellm", "pip install fakellm")
    (tmp_path / "site" / "fakellm" / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="recorded no checksum"):
        verify_installed(tmp_path / "site" / "fakellm" / "other.gguf", "fakellm", "pip install fakellm")


def test_a_cached_conversion_is_reused_only_while_it_matches_its_record(tmp_path: Path, monkeypatch) -> None:
    """The zoo's converted directory records its GGUF's digest and its files': another source or a changed file
    makes ``llm_dir`` convert again (with a warning) instead of loading a damaged cache."""
    import bitsmith.zoo.llm as llm

    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    conversions = []

    def convert(path: Path, out: Path, digest: str | None = None, replace: bool = False) -> Path:
        conversions.append(replace)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")
        files = {n: d for n, d in llm.folder_digests(out).items() if n != llm.SOURCE_RECORD}
        (out / llm.SOURCE_RECORD).write_text(llm.json.dumps({"gguf": path.name, "sha256": digest, "files": files}))
        return out

    digest = ["a" * 64]
    monkeypatch.setattr(llm, "verified_gguf", lambda name: (gguf, digest[0]))
    monkeypatch.setattr(llm, "convert_gguf", convert)
    out = llm.llm_dir("smollm2")
    assert conversions == [False] and llm.cache_problem(out, digest[0]) is None
    llm.llm_dir("smollm2")
    assert conversions == [False]  # reused
    (out / "model.safetensors").write_bytes(b"weightz")
    assert llm.cache_problem(out, digest[0]) == "model.safetensors changed since the conversion"
    llm.llm_dir("smollm2")
    assert conversions == [False, True]
    digest[0] = "b" * 64  # the package was reinstalled with another file
    assert "other than the installed one" in llm.cache_problem(out, digest[0])
    llm.llm_dir("smollm2")
    assert conversions == [False, True, True]
    (out / llm.SOURCE_RECORD).unlink()  # a cache from before records existed
    assert "no readable" in llm.cache_problem(out, digest[0])


def test_scoring_text_logs_its_progress(caplog) -> None:  # type: ignore[no-untyped-def]
    """A long LLM evaluation is visibly alive: about ten lines per text, naming the window and the time."""
    from bitsmith.eval.lm import score

    rows = torch.randint(0, 96, (20, 16), generator=torch.Generator().manual_seed(0))
    with caplog.at_level("INFO", logger="bitsmith"):
        score(make_llama(), rows, what="Persuasion")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scoring Persuasion")]
    assert len(lines) == 9 and lines[0].startswith("scoring Persuasion: window 2/20")


def test_a_model_without_a_topology_adapter_is_refused() -> None:
    with pytest.raises(ValueError, match="has no topology adapter"):
        topology_of(nn.Linear(2, 2))


def test_awq_at_8_bits_keeps_the_float_model() -> None:
    """AWQ's scales are folded (1/s into the norm or feeding linear, s into the weights): at 8 bits the model's
    output stays that of the float model. Scaling the weights without the fold would change the function."""
    model = make_llama()
    calib = token_batches(count=2, batch=2, length=32)
    ids = calib[0]["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    compress(model, [build_method({"name": "awq", "bits": 8, "group_size": 32, "n_grid": 5, "where": BLOCKS})], calib)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert (out - reference).pow(2).mean() < 1e-3 * reference.pow(2).mean()


def test_float_zero_rtn_reproduces_a_min_offset_grid_exactly() -> None:
    """Weights on a Q4_1-style grid ``min + d * k`` (the GGUF references) come back unchanged from RTN with
    ``float_zero``; the integer-zero-point grid cannot hold them (the loader check depends on this)."""
    g = torch.Generator().manual_seed(0)
    lo, step = torch.randn(16, 4, 1, generator=g) - 1.0, torch.rand(16, 4, 1, generator=g) * 0.1 + 0.01
    k = torch.randint(0, 16, (16, 4, 32), generator=g)
    k[..., 0], k[..., 1] = 0, 15
    weight = (lo + step * k).reshape(16, 128)
    model = nn.Sequential(nn.Linear(128, 16, bias=False))
    model[0].weight.data.copy_(weight)
    compress(model, [build_method({"name": "rtn", "bits": 4, "group_size": 32, "float_zero": True})])
    assert torch.allclose(model[0].effective_weight(), weight, atol=1e-6)
    integer = nn.Sequential(nn.Linear(128, 16, bias=False))
    integer[0].weight.data.copy_(weight)
    compress(integer, [build_method({"name": "rtn", "bits": 4, "group_size": 32})])
    assert not torch.allclose(integer[0].effective_weight(), weight, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_smoothquant_smooths_decoder_blocks_in_place_and_keeps_the_float_model(model_type: str) -> None:
    """Block by block, ``1/s`` is folded into the RMSNorm gains (Gemma's ``1 + w`` too) and the feeding
    linears, so logits are unchanged, and the outlier channel fed to q/k/v shrinks relative to the rest."""
    model = make_llama(model_type=model_type)
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[7] = 40.0  # one outlier channel into block 1's q/k/v
    calib = token_batches(count=2, batch=2, length=16)
    ids = calib[0]["input_ids"]
    seen: dict[str, torch.Tensor] = {}

    def spread(m: nn.Module) -> float:
        handle = m.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
            lambda mod, a: seen.__setitem__("x", a[0].abs().amax(dim=(0, 1)))
        )
        with torch.no_grad():
            logits = m(input_ids=ids).logits
        handle.remove()
        seen["logits"] = logits
        return float(seen["x"][7] / seen["x"].median())

    before = spread(model)
    reference = seen["logits"]
    compress(model, [build_method({"name": "smoothquant", "alpha": 0.5, "layers": "all", "where": BLOCKS})], calib)
    after = spread(model)
    assert torch.allclose(seen["logits"], reference, atol=1e-4, rtol=1e-4)
    assert after < 0.5 * before
    assert all(getattr(m, "smooth", None) is None for m in model.modules() if isinstance(m, QLinear))


def test_mixed_scores_a_causal_lm_on_next_tokens_and_gptq_keeps_its_bits() -> None:
    """``mixed`` measures a decoder's sensitivity on its own objective (the HF next-token loss, not the
    model's argmax), and ``[mixed, gptq]`` is mixed-precision GPTQ: every layer keeps its allocated bits."""
    from bitsmith.methods.ptq.mixed import MixedPrecision

    model = make_llama()
    calib = token_batches(count=2, batch=4, length=16)
    entry = {"name": "mixed", "sensitivity": "fisher", "candidates": [2, 3, 4], "avg_bits": 3.0, "a_bits": None,
             "w_granularity": "group", "w_group_size": 32, "w_symmetric": False, "where": BLOCKS}  # fmt: skip
    mixed = build_method(entry)
    assert isinstance(mixed, MixedPrecision)
    inputs, labels = mixed._inputs_and_labels(model, calib[0])
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
        assert torch.allclose(mixed.calibration_loss(out.logits, labels), out.loss, atol=1e-5)
    compress(model, [mixed, build_method({"name": "gptq", "where": BLOCKS})], calib)
    allocation = {name: bits["w_bits"] for name, bits in mixed.allocation.items()}
    layers = {name: model.get_submodule(name) for name in allocation}
    assert {name: layer.weight_q.bits for name, layer in layers.items()} == allocation
    numel = {name: layer.weight.numel() for name, layer in layers.items()}
    assert len(set(allocation.values())) > 1
    assert sum(allocation[n] * numel[n] for n in numel) <= 3.0 * sum(numel.values()) + 1e-6


def test_capturing_block_inputs_never_runs_the_lm_head() -> None:
    """The calibration pass stops at the last block's inputs: the LM head (vocabulary-sized logits, the
    largest activation of a small LLM) never runs, so it does not set the peak memory."""
    model = make_llama()
    calls: list[int] = []
    model.lm_head.register_forward_hook(lambda m, a, o: calls.append(1))
    sequential(model, token_batches(), lambda *a: None)
    assert calls == []


def test_act_order_quantizes_the_largest_hessian_diagonal_first() -> None:
    """The first column GPTQ rounds is rounded from the untouched weight; with act-order that is the column of the
    largest Hessian diagonal, and the smallest one comes last (after every other column's error reached it)."""
    g = torch.Generator().manual_seed(0)
    x = correlated_inputs()
    x[:, 5] *= 6.0  # column 5: the largest diagonal
    x[:, 9] *= 0.1  # column 9: the smallest
    hessian = 2 * x.T @ x / x.shape[0]
    weight = torch.randn(16, 64, generator=g)
    values, params = gptq_quantize(weight, hessian, 3, 0, False, 0.01, True, 128)
    assert torch.equal(values[:, 5], params.quantize(weight[:, 5], 5))
    assert not torch.equal(values[:, 9], params.quantize(weight[:, 9], 9))


def test_true_sequential_takes_later_hessians_after_the_earlier_groups_are_quantized() -> None:
    """q/k/v (the first group) see the float block either way; o_proj's inputs differ only when q/k/v are already
    quantized (true_sequential), so only o_proj's result changes."""
    results = {}
    for flag in (True, False):
        model = make_llama()
        compress(model, [build_method({"name": "gptq", "bits": 3, "group_size": 32, "where": BLOCKS,
                                       "true_sequential": flag})], token_batches())  # fmt: skip
        attention = model.model.layers[0].self_attn
        results[flag] = attention.q_proj.weight.detach().clone(), attention.o_proj.weight.detach().clone()
    assert torch.equal(results[True][0], results[False][0])
    assert not torch.equal(results[True][1], results[False][1])


def test_awq_scores_the_attention_group_on_the_attention_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """q/k/v's scales are scored on what the attention module outputs (the official ``module2inspect``), so the
    attention itself runs inside the search, not only the three linears; the block's other linears (o_proj)
    compute in float there, as in the official search."""
    from bitsmith.methods.llm import awq

    calls: list[tuple[str, bool]] = []
    real = awq._call

    def spy(module, *args):  # noqa: ANN001, ANN202
        float_o_proj = getattr(getattr(module, "o_proj", None), "weight_q", None) is None
        calls.append((type(module).__name__, float_o_proj))
        return real(module, *args)

    monkeypatch.setattr(awq, "_call", spy)
    compress(make_llama(), [build_method({"name": "awq", "bits": 4, "group_size": 32, "where": BLOCKS,
                                          "n_grid": 4})], token_batches())  # fmt: skip
    attention = [float_o_proj for name, float_o_proj in calls if name == "LlamaAttention"]
    assert attention and all(attention)  # o_proj computes in float while q/k/v's scales are searched


@needs_llm
def test_a_calibration_mix_takes_python_docs_windows_only_after_the_text_the_evaluation_reads() -> None:
    """``docs_share`` 0.5: half the calibration windows come from the Python docs, each from beyond the last token
    the docs evaluation scores (no window of the test text is calibrated on); the other half from Austen."""
    from bitsmith.eval.lm import language_model_task, token_stream
    from bitsmith.zoo.llm import load_llm
    from bitsmith.zoo.prose import python_docs

    _, tokenizer = load_llm("smollm2")
    task = language_model_task(tokenizer, 2, 8, 4, seed=0, window=64, docs_share=0.5)
    docs = token_stream(tokenizer, python_docs())
    read_by_eval = task.eval_rows["perplexity_docs"].numel()
    calib = torch.cat([batch["input_ids"] for batch in task.calibration])

    def found_at(row: torch.Tensor) -> int:  # where the window's tokens start in the docs stream, -1 if absent
        hits = torch.nonzero((docs.unfold(0, 64, 1) == row).all(1)).flatten()
        return int(hits[0]) if hits.numel() else -1

    starts = [found_at(row) for row in calib]
    assert sum(s >= 0 for s in starts) == 4 and all(s < 0 or s >= read_by_eval for s in starts)
    with pytest.raises(ValueError, match="the evaluation reads all .* tokens of the Python docs"):
        language_model_task(tokenizer, None, 4, 4, seed=0, window=64, docs_share=0.5)
