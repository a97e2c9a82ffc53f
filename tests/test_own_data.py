"""The user's own models and data (``bitsmith.own_data``), the task registry (``bitsmith.tasks``) and the
``examples/own_data`` recipes end to end on small data the tests make."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from bitsmith.cli import main
from bitsmith.own_data import DataError, build_model, image_folder, read_text_records
from bitsmith.recipe import RecipeError, parse_recipe
from bitsmith.tasks import TASKS, TaskKind, register_task, task_kind
from test_recipe_cli import needs_data, needs_llm, needs_minilm

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "own_data"


def write_images(root: Path, classes: dict[str, int], size: int = 6, mode: str = "RGB") -> None:
    """``count`` images per class, each class a different flat colour (so a classifier can tell them apart)."""
    from PIL import Image

    for index, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new(mode, (size, size), (40 * index + i, 200 - 50 * index, 7 * i)).save(root / name / f"{i}.png")


def test_image_folder_reads_classes_in_order_and_holds_out_a_share(tmp_path: Path) -> None:
    write_images(tmp_path, {"b-second": 6, "a-first": 4})
    (tmp_path / "a-first" / "notes.txt").write_text("not an image")  # ignored: only image suffixes are read
    splits = image_folder(tmp_path, size=4, channels=3, eval_share=0.25, seed=0)
    assert splits.classes == ["a-first", "b-second"]
    images, labels = torch.cat([splits.train[0], splits.test[0]]), torch.cat([splits.train[1], splits.test[1]])
    assert images.shape == (10, 3, 4, 4) and splits.test[0].shape[0] == 2  # round(10 * 0.25)
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 6
    green = {0: 150 / 255, 1: 200 / 255}  # "a-first" was drawn second (green 150), "b-second" first (200)
    for label, value in green.items():
        assert torch.allclose(images[labels == label][:, 1], torch.tensor(value), atol=1e-6)
    again = image_folder(tmp_path, size=4, channels=1, eval_share=0.25, seed=0)
    assert again.train[0].shape[1] == 1 and torch.equal(again.test[1], splits.test[1])  # same seed, same split


def test_image_folder_with_train_and_val_is_split_as_laid_out(tmp_path: Path) -> None:
    write_images(tmp_path / "train", {"cat": 3, "dog": 2})
    write_images(tmp_path / "val", {"cat": 1, "dog": 1})
    splits = image_folder(tmp_path, size=4, channels=3, eval_share=0.5, seed=0)
    assert splits.train[1].tolist() == [0, 0, 0, 1, 1] and splits.test[1].tolist() == [0, 1]


@pytest.mark.parametrize(
    ("layout", "message"),
    [("missing", "no such directory"), ("one-class", "1 class folder"), ("empty", "holds no images"),
     ("broken", "not a readable image")],
)  # fmt: skip
def test_bad_image_folders_are_one_line_naming_the_field(tmp_path: Path, layout: str, message: str) -> None:
    root = tmp_path / "images"
    if layout == "one-class":
        write_images(root, {"only": 2})
    elif layout == "empty":
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
    elif layout == "broken":
        write_images(root, {"a": 1, "b": 1})
        (root / "a" / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=message) as caught:
        image_folder(root, size=4, channels=3, eval_share=0.5, seed=0)
    assert str(caught.value).startswith("data.path:") and "\n" not in str(caught.value)


def test_text_records_from_txt_folder_and_json_lines(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("first document")
    assert read_text_records(tmp_path / "one.txt", "text") == [("first document", "")]
    (tmp_path / "two.txt").write_text("second document")
    assert [t for t, _ in read_text_records(tmp_path, "text")] == ["first document", "second document"]
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"body": "x one", "title": "t1"}\n\n{"body": "x two", "title": "t2"}\n')
    assert read_text_records(lines, "body", "title") == [("x one", "t1"), ("x two", "t2")]
    with pytest.raises(DataError, match=r"data.column: 'text' is not a column .*; its columns: body, title"):
        read_text_records(lines, "text")
    lines.write_text('{"body": 3}\n')
    with pytest.raises(DataError, match="holds int values, not text"):
        read_text_records(lines, "body")


def test_text_records_from_parquet_and_a_saved_datasets_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"content": ["alpha beta", "gamma"], "label": [0, 1]})
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "rows.parquet", tmp_path / "saved"):
        assert [t for t, _ in read_text_records(path, "content")] == ["alpha beta", "gamma"]
    with pytest.raises(DataError, match="holds int values"):
        read_text_records(tmp_path / "saved", "label")


def small_net(classes: int = 2) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, classes))


def not_a_module() -> str:
    return "a string"


def test_build_model_calls_the_named_factory_and_loads_its_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = build_model("test_own_data:small_net", {"classes": 3}, None)
    assert model[1].out_features == 3 and not model.training
    torch.manual_seed(5)
    trained = small_net(3)
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    for file in ("w.safetensors", "w.pt"):
        loaded = build_model("test_own_data:small_net", {"classes": 3}, str(tmp_path / file))
        assert torch.equal(loaded[1].weight, trained[1].weight)


def test_build_model_refuses_what_is_not_a_module_or_not_a_state_dict(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="model.factory: .*expected 'package.module:callable'"):
        build_model("no_colon_here", {}, None)
    with pytest.raises(DataError, match="model.factory: cannot import"):
        build_model("no_such_module_xyz:net", {}, None)
    with pytest.raises(DataError, match="returned a str, not a torch.nn.Module"):
        build_model("test_own_data:not_a_module", {}, None)
    torch.save(small_net(2), tmp_path / "whole.pt")  # a pickled module: never unpickled
    with pytest.raises(DataError, match="never unpickles whole modules"):
        build_model("test_own_data:small_net", {}, str(tmp_path / "whole.pt"))
    torch.save(small_net(5).state_dict(), tmp_path / "other.pt")
    with pytest.raises(DataError, match="does not fit the model"):
        build_model("test_own_data:small_net", {}, str(tmp_path / "other.pt"))


def test_recipes_resolve_their_task_from_the_registry(tmp_path: Path) -> None:
    assert {"classification", "embedding", "generation", "language-model"} <= set(TASKS.names())
    recipe = parse_recipe({"model": {"factory": "test_own_data:small_net"}, "data": {"path": str(tmp_path)}})
    assert recipe.task == "classification" and recipe.data.name == "own"
    assert parse_recipe({"model": {"name": "cnn"}}).data.name == "fashion-mnist"
    assert parse_recipe({"model": {"name": "smollm2"}}).task == "language-model"
    assert parse_recipe({"model": {"name": "minilm"}}).task == "embedding"
    assert parse_recipe({"model": {"name": "ddpm"}}).task == "generation"


@pytest.mark.parametrize(
    ("raw", "message"),
    [({"task": "segmentation", "model": {"name": "cnn"}}, "task: unknown task 'segmentation'; registered: "),
     ({"model": {"factory": "m:f", "name": "cnn"}}, "give one of a zoo model 'name'"),
     ({"model": {"name": "cnn", "weights": "w.pt"}}, "'weights' and 'kwargs' belong to 'factory'"),
     ({"task": "language-model", "model": {"factory": "m:f"}}, "model.factory: a language model needs its tokenizer"),
     ({"model": {"factory": "m:f"}, "data": {"path": "no/such/folder"}}, "data.path: no/such/folder is not a dir"),
     ({"model": {"name": "minilm"}, "train": {"epochs": 1}}, "train: training needs a labelled classification"),
     ({"model": {"name": "minilm"}, "data": {"name": "austen"}}, "data.name: the embedding task of minilm reads")],
)  # fmt: skip
def test_bad_task_and_model_fields_are_one_line(raw: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_recipe(raw)


def test_a_registered_task_kind_takes_the_recipes_it_claims(tmp_path: Path) -> None:
    """A third-party kind (as an entry point would register it) is chosen by ``task:`` and loads the model."""

    @register_task("test-constant")
    class ConstantKind(TaskKind):
        order = 5
        data_names = ("fashion-mnist",)

        def load(self, recipe, smoke, source):  # noqa: ANN001, ANN201
            return small_net(2), "the task"

    try:
        recipe = parse_recipe({"task": "test-constant", "model": {"name": "cnn"}})
        assert isinstance(task_kind(recipe), ConstantKind)
        assert task_kind(recipe).load(recipe, True, "")[1] == "the task"
        assert task_kind(parse_recipe({"model": {"name": "cnn"}})).registered_name == "classification"  # claims
    finally:
        TASKS._items.pop("test-constant")


def example(name: str, **changes: dict) -> dict:
    raw = yaml.safe_load((EXAMPLES / name).read_text())
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return raw


@needs_data
def test_examples_own_classifier_on_an_image_folder_trains_and_reports(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """examples/own_data/images.yaml on the image folder make_data.py writes (3 Fashion-MNIST classes as RGB PNGs):
    the user's tiny_net trains with QAT and beats chance; the report names the own data."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from make_data import make_images

    folder = make_images(tmp_path, per_class=40)
    recipe = tmp_path / "images.yaml"
    recipe.write_text(yaml.safe_dump(example("images.yaml", data={"path": str(folder)}, train={"epochs": 20})))
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data"] == {"name": "own", "eval_examples": 30, "calib_examples": 64}
    assert report["compressed"]["metrics"]["accuracy"] > 0.5  # 3 classes: chance is 1/3
    assert {layer["type"] for layer in report["compressed"]["layers"]} >= {"QConv2d", "QLinear"}


@needs_minilm
def test_examples_encoder_on_own_json_lines_scores_cosine_and_retrieval(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from make_data import make_text

    lines = make_text(tmp_path, records=40)
    recipe = tmp_path / "enc.yaml"
    recipe.write_text(yaml.safe_dump(example("text-encoder.yaml", data={"path": str(lines)})))
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--smoke"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data"]["name"] == "own" and report["data"]["eval_examples"] == 10
    comp = report["compressed"]["metrics"]
    assert 0.9 < comp["cosine"] < 1.0 and 0.0 <= comp["retrieval"] <= 1.0
    single = example("text-encoder.yaml", data={"path": str(lines), "pair_column": None})
    recipe.write_text(yaml.safe_dump(single))  # one column: cosine only
    assert main(["run", str(recipe), "--out", str(tmp_path / "one"), "--smoke"]) == 0
    assert "retrieval" not in json.loads((tmp_path / "one" / "report.json").read_text())["compressed"]["metrics"]


@needs_llm
def test_examples_language_model_on_own_text(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """examples/own_data/text-lm.yaml with a tiny random Llama (SmolLM2's tokenizer) on make_data.py's JSON lines:
    perplexity on the held-out last share of the text, GPTQ W4 on the rest."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bitsmith.zoo.llm import llm_dir

    monkeypatch.syspath_prepend(str(EXAMPLES))
    from make_data import make_text

    tokenizer = AutoTokenizer.from_pretrained(llm_dir("smollm2"), local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    directory = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    lines = make_text(tmp_path, records=40)
    raw = example("text-lm.yaml", model={"path": str(directory)}, data={"path": str(lines)})
    raw["model"].pop("name")
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(tmp_path / "lm.yaml"), "--out", str(tmp_path / "run"), "--smoke"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    base, comp = report["baseline"]["metrics"], report["compressed"]["metrics"]
    assert report["data"]["name"] == "own" and "perplexity" not in base
    assert base["perplexity_own"] > 1.0 and comp["kl"] > 0.0 and comp["perplexity_own"] != base["perplexity_own"]


class CharTokenizer:
    """One token per character (its code point), no special tokens: enough for the text task's windows."""

    bos_token_id = None

    def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def test_own_text_evaluates_the_last_share_and_calibrates_on_the_rest() -> None:
    """The language-model task on a user's text: evaluation windows come only from the last ``eval_share`` of the
    tokens, calibration windows only from the part before it (a leak either way would score calibrated text)."""
    from bitsmith.eval.lm import text_language_model_task

    text = "a" * 900 + "b" * 100
    task = text_language_model_task(CharTokenizer(), text, None, 6, 3, seed=0, eval_share=0.1, window=20)
    rows = task.eval_rows["perplexity_own"]
    assert rows.shape == (5, 20) and set(rows.unique().tolist()) == {ord("b")}
    calib = torch.cat([b["input_ids"] for b in task.calibration])
    assert calib.shape == (6, 20) and set(calib.unique().tolist()) == {ord("a")}
    with pytest.raises(
        ValueError, match=r"data.path: the text has 10 tokens, fewer than one window of 20;.*eval_share"
    ):
        text_language_model_task(CharTokenizer(), "a" * 90 + "b" * 10, None, 1, 1, seed=0, eval_share=0.1, window=20)


def test_own_texts_for_an_encoder_hold_out_records_and_score_pairs_only_when_given() -> None:
    from bitsmith.eval.tasks import text_embedding_task

    records = [(f"body {i}", f"title {i}") for i in range(10)]
    task = text_embedding_task(None, records, None, 100, 4, seed=0, eval_share=0.3)
    assert len(task.pairs) == 3 and task.paired
    held = {body for body, _ in task.pairs}
    assert not held & set(task.calib_texts) and len(task.calib_texts) == 14  # 7 records, body and title each
    single = text_embedding_task(None, [(t, "") for t, _ in records], None, 100, 4, seed=0, eval_share=0.3)
    assert not single.paired and "" not in single.calib_texts
