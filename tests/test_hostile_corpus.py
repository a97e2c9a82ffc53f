"""Replay the committed corpus of hostile files (tests/hostile/, written by make_corpus.py): each checkpoint
ends in ``CheckpointError`` naming the file, each recipe in one short ``RecipeError`` line, all fast; through
the CLI each is one line with exit code 2."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bitsmith import CheckpointError, load
from bitsmith.cli import main
from bitsmith.recipe import RecipeError, load_recipe
from conftest import make_cnn

CORPUS = Path(__file__).parent / "hostile"
CHECKPOINTS = sorted(CORPUS.glob("*.safetensors"))
RECIPES = sorted(CORPUS.glob("*.yaml"))


def test_the_corpus_is_there() -> None:
    assert len(CHECKPOINTS) >= 10 and len(RECIPES) >= 10


@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: p.stem)
def test_hostile_checkpoints_are_refused(path: Path, capsys: pytest.CaptureFixture) -> None:
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=path.name):
        load(path, make_cnn())
    assert time.perf_counter() - start < 5
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_hostile_recipes_are_refused(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    start = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert time.perf_counter() - start < 5
    assert "\n" not in str(info.value) and len(str(info.value)) < 600
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()  # refused before any output
