"""Recipe sweeps on Ray: grid parsing and validation, the Pareto front, and a real 6-run smoke sweep on a local
Ray that resumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitsmith.cli import main
from bitsmith.recipe import RecipeError
from bitsmith.sweep import check_reachable, combinations, pareto_front, parse_grid, run_name, run_sweep
from test_recipe_cli import needs_data

RECIPE = Path(__file__).parents[1] / "recipes" / "cnn-ptq-w8a8.yaml"


def test_a_grid_is_every_combination_of_its_values() -> None:
    grid = parse_grid(["methods.0.w_bits=4,8", "methods.0.a_bits=6, 7,8"])
    runs = combinations(grid)
    assert len(runs) == 6 and runs[1] == ["methods.0.w_bits=4", "methods.0.a_bits=7"]
    assert run_name(runs[1]) == "w_bits=4,a_bits=7"


@pytest.mark.parametrize("item", ["methods.0.w_bits", "=4,8", "methods.0.w_bits=", "methods.0.w_bits=,"])
def test_a_malformed_grid_item_is_refused(item: str) -> None:
    with pytest.raises(RecipeError, match="FIELD=VALUE1,VALUE2"):
        parse_grid([item])


def test_the_front_keeps_only_runs_no_other_run_beats_on_cost_and_quality() -> None:
    points = [("a", 10, 90.0), ("b", 20, 89.0), ("c", 30, 95.0), ("d", 5, 80.0), ("e", 30, 94.0)]
    assert pareto_front(points) == ["d", "a", "c"]
    assert pareto_front([("x", 1, 50.0), ("y", 2, 40.0)], higher_is_better=False) == ["x", "y"]


def test_a_grid_over_a_field_the_recipe_lacks_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["sweep", str(RECIPE), "--grid", "methods.0.w_bitz=4,8", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--grid methods.0.w_bitz=4: methods.0.w_bitz: unknown field" in err
    assert not (tmp_path / "runs").exists()


def test_an_unreachable_ray_address_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConnectionError, match="no Ray cluster answers there"):
        check_reachable("127.0.0.1:1")
    assert main(["sweep", str(RECIPE), "--grid", "methods.0.w_bits=4", "--out", str(tmp_path), "--smoke",
                 "--address", "127.0.0.1:1"]) == 2  # fmt: skip
    assert "--address 127.0.0.1:1: no Ray cluster answers there" in capsys.readouterr().err


def test_a_huge_grid_is_refused_before_any_combination_is_built(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import time

    items = [
        "methods.0.w_bits=" + ",".join(str(b) for b in range(2, 10)),
        "methods.0.a_bits=" + ",".join("2345678"),
        "train.lr=" + ",".join(str(i / 100) for i in range(1, 31)),
        "data.seed=" + ",".join(map(str, range(30))),
    ]
    start = time.perf_counter()
    assert main(["sweep", str(RECIPE), *[a for i in items for a in ("--grid", i)], "--out", str(tmp_path)]) == 2
    assert time.perf_counter() - start < 10
    assert "--grid: 50400 combinations (8 x 7 x 30 x 30); a sweep runs at most 1000" in capsys.readouterr().err


class Listener:
    """A loopback port that accepts connections and answers like ``reply`` (or stays silent), not like Ray."""

    def __init__(self, reply: bytes | None) -> None:
        import socket
        import threading

        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.reply = reply
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            if self.reply is not None:
                connection.recv(1024)
                connection.sendall(self.reply)
                connection.close()


@pytest.mark.parametrize("reply", [None, b"HTTP/1.1 400 Bad Request\r\n\r\n", b""], ids=["silent", "http", "closes"])
def test_a_listening_port_that_is_not_ray_is_one_line_within_seconds(reply: bytes | None, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    import time

    listener = Listener(reply)
    address = f"127.0.0.1:{listener.port}"
    start = time.perf_counter()
    assert main(["sweep", str(RECIPE), "--grid", "methods.0.w_bits=4", "--out", str(tmp_path), "--smoke",
                 "--address", address]) == 2  # fmt: skip
    assert time.perf_counter() - start < 15
    err = capsys.readouterr().err
    assert f"--address {address}: something listens there but it is not a Ray cluster" in err
    listener.server.close()


@pytest.mark.slow
def test_a_ray_sweep_of_six_smoke_runs_finishes_resumes_and_reports(tmp_path: Path) -> None:
    grid = parse_grid(["methods.0.w_bits=4,8", "methods.0.a_bits=6,7,8"])
    fixed = ["export.deploy=none"]
    first = run_sweep(RECIPE, grid, tmp_path, smoke=True, fixed=fixed)
    assert len(first.ran) == 6 and not first.failed and not first.skipped
    report = (tmp_path / "sweep.md").read_text()
    assert report.count("| w_bits=") == 6 and "yes" in report and (tmp_path / "pareto.png").is_file()

    again = run_sweep(RECIPE, grid, tmp_path, smoke=True, fixed=fixed)  # everything finished: nothing runs
    assert again.ran == [] and len(again.skipped) == 6

    (tmp_path / "runs" / "w_bits=8,a_bits=7" / "manifest.json").unlink()  # as a run killed mid-write leaves it
    resumed = run_sweep(RECIPE, grid, tmp_path, smoke=True, fixed=fixed)
    assert resumed.ran == ["w_bits=8,a_bits=7"] and len(resumed.skipped) == 5


@needs_data
def test_a_run_is_finished_for_its_own_recipe_overrides_and_smoke_flag_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What the run records is what the sweep asks for: the same recipe, overrides and --smoke; another W or a
    real (non-smoke) run does not reuse it."""
    from bitsmith.sweep import fingerprint_of, finished, run_one

    recipe = str(RECIPE)
    assert "error" not in run_one(recipe, ["methods.0.w_bits=4"], str(tmp_path / "w4"), True)
    assert finished(tmp_path / "w4", fingerprint_of(recipe, ["methods.0.w_bits=4"], True))
    assert not finished(tmp_path / "w4", fingerprint_of(recipe, ["methods.0.w_bits=4"], False))
    assert not finished(tmp_path / "w4", fingerprint_of(recipe, ["methods.0.w_bits=2"], True))
    with caplog.at_level("WARNING", logger="bitsmith"):  # rerun into the finished folder: said, then replaced
        assert "error" not in run_one(recipe, ["methods.0.w_bits=2"], str(tmp_path / "w4"), True)
    assert "holds a finished run; its outputs are replaced" in caplog.text
    assert finished(tmp_path / "w4", fingerprint_of(recipe, ["methods.0.w_bits=2"], True))
