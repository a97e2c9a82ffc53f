"""llama.cpp as a backend (heavy: needs ``make install-llamacpp`` and SmolLM2): a GGUF file bitsmith writes is
scored by llama.cpp on the same windows as PyTorch, with the same numbers for the FP32 model; a bitsmith Q4_0
file is close to bitsmith's own model; missing builds are one line with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitsmith.export import llamacpp
from test_recipe_cli import needs_llm


def built() -> bool:
    try:
        llamacpp.check()
    except FileNotFoundError:
        return False
    return True


needs_llamacpp = pytest.mark.skipif(not built(), reason="llama.cpp is not built: make install-llamacpp")


def test_a_missing_build_names_the_make_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSMITH_LLAMACPP_BUILD", str(tmp_path / "nothing"))
    with pytest.raises(
        FileNotFoundError, match="llama-quantize is not built in .*nothing: run `make install-llamacpp`"
    ):
        llamacpp.tool("llama-quantize")


def test_eval_of_a_missing_gguf_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bitsmith.cli import main

    assert main(["eval", str(tmp_path / "model.gguf")]) != 0
    assert "model.gguf: no such GGUF file" in capsys.readouterr().err


@pytest.mark.heavy
@needs_llm
@needs_llamacpp
def test_llama_cpp_scores_bitsmiths_files_like_pytorch(tmp_path: Path) -> None:
    import torch

    from bitsmith import build_method, compress
    from bitsmith.eval.lm import language_model_task, score
    from bitsmith.export.gguf_file import write_gguf
    from bitsmith.zoo.llm import gguf_path, load_llm

    model, tokenizer = load_llm("smollm2")
    rows = language_model_task(tokenizer, 1, 1, 1, seed=0).eval_rows["perplexity"]
    f32 = write_gguf(model, gguf_path("smollm2"), tmp_path / "f32.gguf")
    lm = llamacpp.GgufLanguageModel(f32, threads=2)
    ours, theirs = score(model, rows)["perplexity"], score(lm, rows, model, 1)
    lm.close()
    assert abs(theirs["perplexity"] - ours) < 1e-3 * ours and theirs["kl"] < 1e-4  # the same model, to rounding
    compress(model, [build_method({"name": "rtn", "grid": "q4_0", "where": {"include": ["model.layers.*"]}})], [])
    q4 = write_gguf(model, gguf_path("smollm2"), tmp_path / "q4_0.gguf")
    lm = llamacpp.GgufLanguageModel(q4, threads=2)
    with torch.no_grad():  # llama.cpp rounds activations to 8 bits in its Q4_0 dot products: close, not equal
        assert score(lm, rows, model, 1)["kl"] < 0.02
    lm.close()
    from bitsmith.cli import main

    assert main(["eval", str(q4), "--windows", "1", "--backend", "llama.cpp"]) == 0  # the CLI: scored and timed
