"""What a user gets from ``pip install bitsmith``: the wheel holds the shipped recipes and ``py.typed``; installed
(not editable) into a fresh virtual environment, ``bitsmith run NAME`` runs a shipped recipe by name."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from bitsmith.recipe import RecipeError, load_recipe
from bitsmith.recipe_yaml import shipped_recipes
from test_recipe_cli import needs_data

ROOT = Path(__file__).parent.parent


def test_shipped_recipes_are_found_by_name_and_listed(capsys: pytest.CaptureFixture[str]) -> None:
    from bitsmith.cli import main

    assert {"cnn-ptq-w8a8", "smollm2-gptq-gguf-q4_0"} <= set(shipped_recipes())
    recipe, _ = load_recipe("cnn-ptq-w8a8")
    assert recipe.model.name == "cnn"
    with pytest.raises(RecipeError, match="recipe no-such-recipe: no such file, and no shipped recipe of that name"):
        load_recipe("no-such-recipe")
    assert main(["recipes"]) == 0
    assert "cnn-ptq-w8a8" in capsys.readouterr().out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import setuptools

    out = tmp_path_factory.mktemp("wheel")
    modern = int(setuptools.__version__.split(".")[0]) >= 71  # builds wheels itself; older ones need `wheel`
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *(["--no-build-isolation"] * modern), "-q",
                    "-w", str(out), str(ROOT)], check=True)  # fmt: skip
    return next(out.glob("bitsmith-*.whl"))


def test_the_wheel_holds_the_recipes_and_py_typed(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "bitsmith/py.typed" in names
    assert {f"bitsmith/recipes/{name}.yaml" for name in shipped_recipes()} <= set(names)


@needs_data
def test_a_shipped_recipe_runs_by_name_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    """A fresh virtual environment with the wheel alone (its dependencies seen through PYTHONPATH, where the
    editable checkout's path hook does not apply), run from a folder without any recipes."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a checkout on the path looks installed
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, env=clean)  # fmt: skip
    env = {**clean, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    where = subprocess.run([str(python), "-c", "import bitsmith; print(bitsmith.__file__)"], env=env,
                           capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert str(tmp_path / "venv") in where.stdout, where.stderr[-2000:]  # the wheel's copy, not the checkout
    done = subprocess.run([str(python), "-m", "bitsmith", "run", "cnn-ptq-w8a8", "--smoke", "--out", "run"], env=env,
                          cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "report.json").is_file()
