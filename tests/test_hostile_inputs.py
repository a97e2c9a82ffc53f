"""Bad input ends in one clear error: non-finite data, hostile recipes, a training state of another run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith import build_method, compress
from bitsmith.recipe import RecipeError, apply_overrides, load_recipe, parse_recipe
from bitsmith.recipe_yaml import MAX_RECIPE_VALUES
from bitsmith.train import StaleTrainingState, TrainConfig, fit
from conftest import make_cnn


def test_nan_in_calibration_data_names_the_batch_and_the_element() -> None:
    calib = [torch.rand(4, 1, 12, 12) for _ in range(3)]
    calib[1][2, 0, 3, 4] = float("nan")
    with pytest.raises(
        ValueError, match=r"calibration batch 1, inputs: 1 non-finite value\(s\), the first nan at \(2, 0, 3, 4\)"
    ):
        compress(make_cnn(), build_method({"name": "ptq", "w_bits": 4, "a_bits": 8}), calib)


def test_inf_in_a_labelled_batch_and_in_training_data_is_refused() -> None:
    images = torch.rand(32, 1, 12, 12)
    images[5, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="calibration batch 0, 0: 1 non-finite"):
        compress(make_cnn(), build_method({"name": "ptq"}), [(images, torch.zeros(32, dtype=torch.long))])
    with pytest.raises(ValueError, match="training data batch 0, inputs: 1 non-finite value"):
        fit(make_cnn(), images, torch.zeros(32, dtype=torch.long), TrainConfig(epochs=1))


def test_a_constant_calibration_set_warns() -> None:
    with pytest.warns(UserWarning, match="every calibration input is constant"):
        compress(make_cnn(), build_method({"name": "ptq"}), [torch.zeros(4, 1, 12, 12)])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = write(tmp_path, "\n".join(levels) + "\nmodel: {name: cnn}\n")  # 9^9 values from 600 bytes
    start = time.perf_counter()
    with pytest.raises(RecipeError, match=f"more than {MAX_RECIPE_VALUES} values once YAML aliases are expanded"):
        load_recipe(bomb)
    assert time.perf_counter() - start < 5


def test_a_huge_recipe_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="bytes; a recipe is at most"):
        load_recipe(write(tmp_path, "model: {name: cnn}\n#" + "x" * 2_000_000))


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"model": {"name": "cnn"}, "methods": [{"name": "ptq", "w_bits": True}]}, r"methods\.0\.w_bits: .*a boolean"),
        ({"model": {"name": "cnn"}, "train": {"epochs": True}}, r"train\.epochs: .*a boolean"),
        ({"model": {"name": "cnn"}, "data": {"root": "/no/such/dir"}}, r"data\.root: no such directory"),
        ({"model": {"name": "cnn"}, "methods": [{"name": "x" * 10_000}]}, r"unknown method 'xxx.*\(10002 characters\)"),
        ({"model": {"name": "cnn"}, "methods": [{"name": "ptq", "where": {"include": ["re:("]}}]}, r"methods\.0"),
        (
            {"model": {"name": "cnn"}, "methods": [{"name": "factorllm", "experts": 1}]},
            r"methods\.0\.experts: .*greater than or equal to 2",
        ),
        (
            {"model": {"name": "cnn"}, "methods": [{"name": "t-rex", "r1": 0}]},
            r"methods\.0\.r1: .*greater than or equal to 1",
        ),
        (
            {"model": {"name": "cnn"}, "methods": [{"name": "pat", "target": 0}]},
            r"methods\.0\.target: .*greater than or equal to 1",
        ),
        (
            {"model": {"name": "cnn"}, "methods": [{"name": "gemq", "bits": 5.0}]},
            r"methods\.0.*candidates' range 1\.\.3",
        ),
    ],
)
def test_bad_values_are_one_short_line(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(RecipeError, match=match) as info:
        parse_recipe(raw)
    assert len(str(info.value)) < 600 and "\n" not in str(info.value)


def test_overrides_into_a_scalar_or_with_bad_yaml_are_errors() -> None:
    raw = {"model": {"name": "cnn"}, "methods": [{"name": "ptq", "w_bits": 4}]}
    with pytest.raises(RecipeError, match=r"override methods\.0\.w_bits\.x: methods\.0\.w_bits is the value 4"):
        apply_overrides(raw, ["methods.0.w_bits.x=3"])
    with pytest.raises(RecipeError, match=r"override methods\.0\.w_bits: not valid YAML"):
        apply_overrides(raw, ["methods.0.w_bits=[1,"])


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
sections = st.fixed_dictionaries(
    {"model": st.one_of(values, st.fixed_dictionaries({"name": st.sampled_from(["cnn", "vit", "nope"])}))},
    optional={
        "methods": st.lists(
            st.one_of(
                values,
                st.fixed_dictionaries(
                    {"name": st.sampled_from(["ptq", "rtn", "bsq", "mixed", "nvit"])},
                    optional={"w_bits": values, "bits": values, "alpha": values, "where": values},
                ),
            ),  # fmt: skip
            max_size=3,
        ),
        "data": values,
        "train": values,
        "eval": values,
        "export": values,
    },
)


@settings(max_examples=150, deadline=None)
@given(raw=sections)
def test_generated_recipes_parse_or_raise_a_recipe_error(raw: dict[str, Any]) -> None:
    try:
        parse_recipe(raw)
    except RecipeError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 2000


def test_a_training_state_of_another_run_is_refused(tmp_path: Path) -> None:
    images, labels = torch.rand(32, 1, 12, 12), torch.randint(0, 10, (32,))
    state = tmp_path / "train_state.pt"
    fit(make_cnn(), images, labels, TrainConfig(epochs=1, batch_size=16), checkpoint=state, fingerprint="recipe-a")
    cfg = TrainConfig(epochs=2, batch_size=16)
    with pytest.raises(StaleTrainingState, match="started by a different recipe.*--restart"):
        fit(make_cnn(), images, labels, cfg, checkpoint=state, fingerprint="recipe-b")
    history = fit(make_cnn(), images, labels, cfg, checkpoint=state, fingerprint="recipe-a")  # the same run resumes
    assert [h["epoch"] for h in history] == [1, 2]


RECIPES = Path(__file__).parent.parent / "recipes"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "cnn-qat-lsq-w4a4.yaml", "train.batch_size=0"], "train: batch_size must be >= 1, got 0"),
        (["run", "cnn-ptq-w8a8.yaml", "methods.0.where.include=['re:(']"], "methods.0"),
        (["run", "cnn-ptq-w8a8.yaml", "methods.0.w_bits.x=1"], "methods.0.w_bits is the value 8"),
        (["run", "cnn-ptq-w8a8.yaml", "methods.0.w_bits=[1,"], "not valid YAML"),
        (["run", "minilm-ptq-w8a8.yaml", "model.name=null", "model.path=README.md"], "model.path: a file; give a"),
        (["run", "cnn-ptq-w8a8.yaml", "--out", "FILE"], "is a file; give a folder"),
        (["run", "cnn-ptq-w8a8.yaml", "--out", "FILE/below"], "cannot write there"),
        (["eval", "x.safetensors", "--runs", "0"], "--runs: expected a whole number >= 1, got 0"),
        (["eval", "x.safetensors", "--batch", "0"], "--batch: expected a whole number >= 1, got 0"),
        (["deploy", "x.safetensors", "--threads", "-1"], "--threads: expected a whole number >= 1, got -1"),
    ],
)
def test_expected_failures_are_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bitsmith.cli import main

    monkeypatch.chdir(Path(__file__).parent.parent)
    (tmp_path / "FILE").write_text("x")
    argv = [str(RECIPES / a) if a.endswith(".yaml") else a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    if argv[0] == "run" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_calibration_batches_of_the_wrong_shape_are_named() -> None:
    ptq = {"name": "ptq", "w_bits": 8, "a_bits": 8}
    with pytest.raises(ValueError, match=r"calibration batch 0 \(tensor 4x144 float32\) does not fit the model"):
        compress(make_cnn(), build_method(ptq), [torch.rand(4, 144)])
    with pytest.raises(ValueError, match=r"calibration batch 1 \(tensor 4x3x12x12 float32\) differs from batch 0"):
        compress(make_cnn(), build_method(ptq), [torch.rand(4, 1, 12, 12), torch.rand(4, 3, 12, 12)])


def test_a_full_disk_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import errno

    from bitsmith import cli

    def full(args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/model.safetensors")

    monkeypatch.setattr(cli, "cmd_zoo", full)
    assert cli.main(["zoo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: No space left on device writing runs/x/model.safetensors; free some space or choose " \
                  "another --out"  # fmt: skip


def test_a_non_finite_layer_is_named_in_calibration_and_training() -> None:
    model = make_cnn()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"first non-finite output is at layer 'fc1' \(Linear\)"):
        compress(model, build_method({"name": "ptq"}), [torch.rand(4, 1, 12, 12)])
    images, labels = torch.rand(16, 1, 12, 12), torch.randint(0, 10, (16,))
    with pytest.raises(FloatingPointError, match=r"epoch 1, step 0 \(the first non-finite output is at layer 'fc1'"):
        fit(model, images, labels, TrainConfig(epochs=1, batch_size=8))


@pytest.mark.parametrize("position", [0, -1])
def test_debug_shows_the_traceback_wherever_it_stands(position: int, tmp_path: Path) -> None:
    from bitsmith.cli import main

    argv = ["run", str(RECIPES / "cnn-qat-lsq-w4a4.yaml"), "--out", str(tmp_path), "train.batch_size=0"]
    argv.insert(position if position == 0 else len(argv), "--debug")
    with pytest.raises(RecipeError, match="batch_size must be >= 1"):
        main(argv)


def test_an_unknown_field_with_a_newline_stays_on_one_line() -> None:
    """Found by the generated-recipes test: a field name holding a newline is quoted, not printed raw."""
    with pytest.raises(RecipeError, match=r"train\.'\\n': unknown field") as caught:
        parse_recipe({"model": {"name": "cnn"}, "train": {"\n": None}})
    assert "\n" not in str(caught.value)
