"""Accuracy-aware tuning: the search over the sensitivity ranking (on synthetic trials whose quality is known),
the stop when even 8 bits everywhere misses, and a real smoke run of ``bitsmith tune``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import bitsmith.tune
from bitsmith.cli import main
from bitsmith.files import publish_run
from bitsmith.recipe import RecipeError

RECIPE = Path(__file__).parents[1] / "recipes" / "cnn-ptq-w4a8.yaml"
LAYERS = [f"layer{i}" for i in range(10)]


def fake_trials(monkeypatch: pytest.MonkeyPatch, accuracy_at: Any) -> list[int]:
    """Replace the ranking and the runs: trial k scores ``accuracy_at(k)`` against FP32 90 %."""
    ran: list[int] = []
    monkeypatch.setattr(bitsmith.tune, "rank_layers", lambda *a: [(n, 1.0 / (i + 1)) for i, n in enumerate(LAYERS)])

    def run_one(recipe: str, overrides: list[str], out: str, smoke: bool) -> dict[str, Any]:
        where = json.loads(next(o for o in overrides if o.startswith("methods.0.where=")).partition("=")[2])
        raised = [name for name in where["overrides"] if name in LAYERS]
        k = len(raised)
        assert sorted(raised) == sorted(LAYERS[:k])  # the k most sensitive layers, at 8 bits
        assert {"@first", "@last"} <= set(where["overrides"])  # the recipe's own overrides are kept
        ran.append(k)
        metrics = lambda acc: {"accuracy": acc, "size_bytes": 1000 * (1 + k)}  # noqa: E731
        report = {"baseline": {"metrics": metrics(0.90)}, "compressed": {"metrics": metrics(accuracy_at(k))}}
        Path(out).mkdir(parents=True, exist_ok=True)
        publish_run(Path(out), {"report.json": lambda p: p.write_text(json.dumps(report))})
        return {"metrics": report["compressed"]["metrics"]}

    monkeypatch.setattr(bitsmith.tune, "run_one", run_one)
    return ran


def test_the_search_finds_the_fewest_layers_that_reach_the_target(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ran = fake_trials(monkeypatch, lambda k: 0.80 + 0.015 * k)  # within 0.5 points from k = 7 on
    state = bitsmith.tune.tune(RECIPE, tmp_path, max_drop=0.5)
    assert state.reached and state.best is not None and state.best.k == 7
    assert ran[:2] == [0, 10] and len(ran) <= 2 + 4  # the recipe, all at 8 bits, then a bisection
    assert json.loads((tmp_path / "best" / "report.json").read_text())["compressed"]["metrics"]["accuracy"] >= 0.895
    assert "reached: 7 layer(s) at 8 bits" in (tmp_path / "tune.md").read_text()


def test_the_recipe_itself_is_enough_when_it_is_within_the_drop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ran = fake_trials(monkeypatch, lambda k: 0.899)
    state = bitsmith.tune.tune(RECIPE, tmp_path, max_drop=0.5)
    assert ran == [0] and state.best is not None and state.best.k == 0


def test_it_stops_and_keeps_the_best_when_8_bits_everywhere_misses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ran = fake_trials(monkeypatch, lambda k: 0.70 + 0.01 * k)
    state = bitsmith.tune.tune(RECIPE, tmp_path, max_drop=0.5)
    assert ran == [0, 10] and not state.reached
    assert state.best is not None and state.best.k == 10  # the closest to the target is kept
    assert "not reached" in (tmp_path / "tune.md").read_text() and (tmp_path / "best" / "report.json").is_file()


def test_bad_tuning_settings_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="--max-drop -1"):
        bitsmith.tune.tune(RECIPE, tmp_path, max_drop=-1)
    for bad in ("nan", "inf"):
        with pytest.raises(RecipeError, match=f"--max-drop {bad}: the allowed drop is a finite number"):
            bitsmith.tune.tune(RECIPE, tmp_path, max_drop=float(bad))
    with pytest.raises(RecipeError, match="--sensitivity curvature"):
        bitsmith.tune.tune(RECIPE, tmp_path, max_drop=1, sensitivity="curvature")
    with pytest.raises(RecipeError, match="methods.0 is bsq"):
        bitsmith.tune.tune(RECIPE.with_name("cnn-bsq.yaml"), tmp_path, max_drop=1)


@pytest.mark.slow
def test_bitsmith_tune_raises_sensitive_layers_of_a_real_model(tmp_path: Path) -> None:
    """2-bit weights on the zoo CNN (smoke subsets) drop far; the tuner finds layers to raise and saves the best."""
    code = main(["tune", str(RECIPE), "--max-drop", "1.0", "--out", str(tmp_path), "--smoke", "methods.0.w_bits=2",
                 "export.deploy=none"])  # fmt: skip
    result = json.loads((tmp_path / "tune.json").read_text())
    trials = {t["k"]: t for t in result["trials"]}
    assert trials[0]["drop"] > 1.0  # 2-bit weights everywhere miss the target
    assert code == (0 if result["reached"] else 1)
    assert (tmp_path / "best" / "model.safetensors").is_file()
    assert result["best"]["k"] > 0 and result["best"]["drop"] < trials[0]["drop"]
