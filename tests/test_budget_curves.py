"""The budget-curve page: gaps signed so that positive means the method is ahead, points paired at equal budget,
every curve's rows found, and the committed page what its generator writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import budget_curves  # noqa: E402
from budget_curves import CURVES, Curve, gap, measured, rows_by_name, trend  # noqa: E402


def test_gap_is_positive_when_the_method_is_ahead() -> None:
    assert gap(80.0, 100.0, lower_is_better=True) == pytest.approx(20.0)  # lower perplexity: ahead by 20 %
    assert gap(120.0, 100.0, lower_is_better=True) == pytest.approx(-20.0)
    assert gap(0.55, 0.60, lower_is_better=False) == pytest.approx(-5.0)  # accuracy: 5 points behind


def test_trend_names_a_gap_that_closes_narrows_or_widens() -> None:
    def points(*gaps: float) -> list[dict]:
        return [{"gaps": {"m": g}} for g in gaps]

    assert "closes" in trend(points(-5.0, -1.0, 0.5), "m")
    assert "narrows" in trend(points(-5.0, -1.0), "m")
    assert "widens" in trend(points(-1.0, -5.0), "m")
    assert "reverses" in trend(points(2.0, -1.0), "m")
    assert trend(points(-1.0), "m") == "one budget measured"


def test_points_pair_method_and_baseline_at_the_same_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"name": "m 1", "acc": 0.5}, {"name": "b 1", "acc": 0.6}, {"name": "m 2", "acc": 0.7},
            {"name": "b 4", "acc": 0.6}, {"name": "m 4", "error": "killed"}]  # fmt: skip
    (tmp_path / "x.json").write_text(json.dumps(rows))
    monkeypatch.setattr(budget_curves, "RESULTS", tmp_path)
    curve = Curve("c", "x.json", "epochs", "more", (("acc", "top-1"),), False,
                  ((1, "m 1", "b 1"), (2, "m 2", "b 2"), (4, "m 4", "b 4")), "cmd")  # fmt: skip
    points = measured(curve)
    assert [p["budget"] for p in points] == [1]  # budget 2 lacks its baseline, budget 4's method row failed
    assert points[0]["gaps"]["acc"] == pytest.approx(-10.0)


def test_every_curve_finds_its_first_budget_rows() -> None:
    for curve in CURVES:
        rows = rows_by_name(curve.results)
        _, method, baseline = curve.points[0]
        assert method in rows and (baseline in rows or curve.baseline_field), (curve.claim, method, baseline)


def test_the_committed_page_is_what_the_generator_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    committed = budget_curves.PAGE.read_text()
    monkeypatch.setattr(budget_curves, "PAGE", tmp_path / "page.md")
    monkeypatch.setattr(budget_curves, "plot", lambda curves: None)
    budget_curves.write()
    assert (tmp_path / "page.md").read_text() == committed, "run: python benchmarks/budget_curves.py"
