"""Hugging Face model directories: their code never runs (not even with "y" on standard input), every hostile
directory of the committed corpus (tests/hostile/hf/, written by make_corpus.py) is one line naming its file,
before any large allocation, through the loader and the CLI; a good directory still loads."""

from __future__ import annotations

import io
import time
from functools import partial
from pathlib import Path

import pytest
import yaml

pytest.importorskip("transformers")

from bitsmith.cli import main  # noqa: E402
from bitsmith.zoo.hf_directory import ModelDirectoryError, check_directory, load_checked  # noqa: E402
from bitsmith.zoo.llm import load_causal_lm  # noqa: E402
from bitsmith.zoo.minilm import load_hf_encoder  # noqa: E402
from conftest import make_llama  # noqa: E402

CORPUS = Path(__file__).parent / "hostile" / "hf"
DIRECTORIES = sorted(p for p in CORPUS.iterdir() if p.is_dir())
# the file each case's message must name
NAMED = {"pickle-weights": "pytorch_model.bin", "auto-map-tokenizer": "tokenizer_config.json",
         "safetensors-truncated": "model.safetensors", "safetensors-flipped-header-byte": "model.safetensors"}  # fmt: skip


@pytest.fixture
def answer_yes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Standard input says "y" to every prompt; returns the path the corpus' code would write if it ran."""
    marker = tmp_path / "MARKER"
    monkeypatch.setenv("BITSMITH_HOSTILE_MARKER", str(marker))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))
    return marker


def test_the_corpus_is_there() -> None:
    assert len(DIRECTORIES) >= 16


@pytest.mark.parametrize("directory", DIRECTORIES, ids=lambda p: p.name)
def test_hostile_directories_are_refused(
    directory: Path, answer_yes: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelDirectoryError) as info:
        load_causal_lm(directory)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "\n" not in message and len(message) < 700
    assert str(directory / NAMED.get(directory.name, "config.json")) in message or str(directory) in message
    assert not answer_yes.exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(directory)}, "data": {"name": "austen"},
                                      "methods": [{"name": "rtn"}]}))  # fmt: skip
    capsys.readouterr()
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--smoke"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not answer_yes.exists()


def test_code_named_by_a_config_is_refused_by_name(answer_yes: Path) -> None:
    directory = CORPUS / "auto-map-config"
    with pytest.raises(ModelDirectoryError, match=r"config.json: asks to run the directory's own code \(auto_map"):
        check_directory(directory, "causal-lm")
    with pytest.raises(ModelDirectoryError, match="tokenizer_config.json: asks to run"):
        check_directory(CORPUS / "auto-map-tokenizer", "causal-lm")
    with pytest.raises(ModelDirectoryError, match="auto_map"):
        load_hf_encoder(directory)
    assert not answer_yes.exists()


def test_transformers_is_never_asked_to_trust_code(answer_yes: Path) -> None:
    """Behind the directory check, the loader itself passes trust_remote_code=False: no prompt, no code."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(ModelDirectoryError, match="custom code"):
        load_checked(CORPUS / "auto-map-config", AutoModelForCausalLM.from_pretrained)
    assert not answer_yes.exists()


def test_sizes_are_bounded_by_the_weights() -> None:
    with pytest.raises(ModelDirectoryError, match="hidden_size = 1048576 is outside"):
        check_directory(CORPUS / "config-huge-hidden", "causal-lm")
    with pytest.raises(ModelDirectoryError, match="the config does not belong to these weights"):
        check_directory(CORPUS / "config-more-layers-than-weights", "causal-lm")
    with pytest.raises(ModelDirectoryError, match="does not fit the layer"):
        check_directory(CORPUS / "quantization-huge-layer", "causal-lm")


def test_missing_unexpected_and_misshapen_weights_are_errors() -> None:
    from transformers import AutoModelForCausalLM

    load = partial(AutoModelForCausalLM.from_pretrained, dtype="float32")
    with pytest.raises(ModelDirectoryError, match=r"missing keys: \['model.layers.0.mlp.down_proj.weight'"):
        load_checked(CORPUS / "tensors-missing", load)
    with pytest.raises(ModelDirectoryError, match=r"unexpected keys: \['model.layers.7.extra.weight'\]"):
        load_checked(CORPUS / "tensor-unexpected", load)
    with pytest.raises(ModelDirectoryError, match="up_proj"):
        load_checked(CORPUS / "tensor-wrong-shape", load)


def test_a_good_directory_passes_the_checks_and_loads(tmp_path: Path) -> None:
    """The checks refuse nothing sound: a float directory (tied embeddings too) and an encoder load."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, BertModel

    model = make_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "llama")
    check_directory(tmp_path / "llama", "causal-lm")
    loaded = load_checked(tmp_path / "llama", partial(AutoModelForCausalLM.from_pretrained, dtype="float32"))
    ids = torch.randint(0, 96, (1, 8))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ModelDirectoryError, match="is not an encoder"):
        check_directory(tmp_path / "llama", "encoder")
    BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")  # fmt: skip
    check_directory(tmp_path / "bert", "encoder")
    load_checked(tmp_path / "bert", AutoModel.from_pretrained)
    with pytest.raises(ModelDirectoryError, match=r"is not a causal LM"):
        check_directory(tmp_path / "bert", "causal-lm")


def test_a_quantized_directory_is_refused_as_the_float_reference() -> None:
    """KL of a quantized checkpoint against an already-quantized reference would read 0: refused in one line."""
    from bitsmith import build_method, compress
    from bitsmith.saved_runs import refuse_quantized_reference
    from conftest import token_batches

    model = make_llama()
    refuse_quantized_reference(model, "float")  # a float model is a reference
    compress(model, [build_method({"name": "rtn", "bits": 4, "group_size": 32})], token_batches())
    with pytest.raises(ValueError, match="--model quantized-dir is itself quantized"):
        refuse_quantized_reference(model, "quantized-dir")
