"""Run folders are consistent: outputs published together with a manifest written last, stale outputs and
temporary files removed, normal permissions, readers refuse an unfinished folder; `--out` is checked first."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bitsmith.eval.report import compare_runs
from bitsmith.files import MANIFEST, IncompleteRun, atomic_write_text, check_run, publish_run, writable_folder


def _report(name: str) -> dict:
    metrics = {"accuracy": 0.9, "size_bytes": 1024, "avg_weight_bits": 8.0, "bops": 1e9, "latency_ms": None}
    return {"name": name, "model": "cnn", "baseline": {"metrics": metrics}, "compressed": {"metrics": metrics}}


def _writers(name: str, with_checkpoint: bool = True) -> dict:
    writers = {
        "report.json": lambda p: atomic_write_text(p, json.dumps(_report(name))),
        "report.md": lambda p: atomic_write_text(p, f"# {name}\n"),
    }
    if with_checkpoint:
        writers["model.safetensors"] = lambda p: atomic_write_text(p, f"weights of {name}")
    return writers


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_outputs_are_published_with_a_manifest_and_normal_permissions(tmp_path: Path) -> None:
    publish_run(tmp_path, _writers("a"))
    assert check_run(tmp_path)["name"] == "a"
    assert set(json.loads((tmp_path / MANIFEST).read_text())["files"]) == {"report.json", "report.md",
                                                                            "model.safetensors"}  # fmt: skip
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask(), path  # not mkstemp's 0600


def test_an_interrupted_publish_leaves_a_folder_that_readers_refuse(tmp_path: Path) -> None:
    publish_run(tmp_path, _writers("old"))

    def killed(path: Path) -> None:
        raise KeyboardInterrupt  # stands for kill -9 between two outputs

    writers = _writers("new")
    writers["report.md"] = killed
    with pytest.raises(KeyboardInterrupt):
        publish_run(tmp_path, writers)
    assert json.loads((tmp_path / "report.json").read_text())["name"] == "new"  # beside the old report.md
    with pytest.raises(IncompleteRun, match="did not finish writing its outputs"):
        check_run(tmp_path)
    with pytest.raises(IncompleteRun):
        compare_runs([tmp_path])
    assert not list(tmp_path.glob(".*.tmp"))  # the failed write removed its temporary file


def test_a_rerun_removes_stale_outputs_and_left_over_temporary_files(tmp_path: Path) -> None:
    publish_run(tmp_path, _writers("a"))
    (tmp_path / ".report.json.x1y2.tmp").write_text("left by a killed write")
    (tmp_path / "notes.txt").write_text("the user's own file")
    publish_run(tmp_path, _writers("b", with_checkpoint=False))
    assert not (tmp_path / "model.safetensors").exists()  # no stale checkpoint beside the new report
    assert not (tmp_path / ".report.json.x1y2.tmp").exists()
    assert (tmp_path / "notes.txt").is_file()
    assert check_run(tmp_path)["name"] == "b"


def test_a_changed_output_is_refused(tmp_path: Path) -> None:
    publish_run(tmp_path, _writers("a"))
    (tmp_path / "model.safetensors").write_text("swapped")
    with pytest.raises(IncompleteRun, match="model.safetensors is missing or differs"):
        check_run(tmp_path)


def test_out_must_be_a_writable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; give a folder"):
        writable_folder(tmp_path / "file")
    with pytest.raises(ValueError, match="cannot write there"):
        writable_folder(tmp_path / "file" / "below")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.access(readonly, os.W_OK):  # root ignores the mode: refuse the write the way the kernel would
        import tempfile

        def refuse(*args: object, **kwargs: object) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(ValueError, match="cannot write there \\(Permission denied\\)"):
        writable_folder(readonly / "run")


def test_report_refuses_runs_of_different_models_or_tasks(tmp_path: Path) -> None:
    for name, model, data in (("a", "cnn", "fashion-mnist"), ("b", "minilm", "docstrings")):
        report = {**_report(name), "model": model, "data": {"name": data}, "smoke": False}
        report["compressed"] = {**report["compressed"], "layers": []}
        publish_run(tmp_path / name, {"report.json": lambda p, r=report: atomic_write_text(p, json.dumps(r))})
    with pytest.raises(ValueError, match="compares runs of one model and task; got cnn on fashion-mnist: .*a; "
                                          "minilm on docstrings: .*b"):  # fmt: skip
        compare_runs([tmp_path / "a", tmp_path / "b"])
    assert "| a |" in compare_runs([tmp_path / "a"])  # no quantized layer: its own latency stays


def test_a_manifest_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    publish_run(tmp_path, _writers("a"))
    (tmp_path / MANIFEST).write_text(json.dumps({"files": ["report.json"]}))
    with pytest.raises(IncompleteRun, match="unreadable"):
        check_run(tmp_path)


def test_atomic_folder_is_whole_or_absent_and_keeps_a_folder_written_meanwhile(tmp_path: Path) -> None:
    from bitsmith.files import atomic_folder

    def fail(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_folder(tmp_path / "out", fail)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    atomic_folder(tmp_path / "out", lambda folder: (folder / "a").write_text("1"))
    atomic_folder(tmp_path / "out", lambda folder: (folder / "b").write_text("2"))  # replaced
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b"]
    atomic_folder(tmp_path / "out", lambda folder: (folder / "c").write_text("3"), replace=False)  # kept
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b"]


def _export(name: str):  # noqa: ANN202
    def write(path: Path) -> None:
        from bitsmith.files import atomic_folder

        atomic_folder(path, lambda tmp: (tmp / "model.safetensors").write_text(f"exported {name}"))

    return write


def test_export_folders_belong_to_the_run_that_wrote_them(tmp_path: Path) -> None:
    """hf/ is published with the run: a rerun without it removes the old one, a failed export leaves the folder
    unfinished, and a changed export file is refused."""
    publish_run(tmp_path, _writers("w4"), folders={"hf": _export("w4")})
    assert check_run(tmp_path)["name"] == "w4" and (tmp_path / "hf" / "model.safetensors").is_file()
    publish_run(tmp_path, _writers("w2"))
    assert not (tmp_path / "hf").exists()  # no W4 hf/ beside the W2 results

    def failing(path: Path) -> None:
        raise OSError("export failed")

    with pytest.raises(OSError):
        publish_run(tmp_path, _writers("w3"), folders={"hf": failing})
    with pytest.raises(IncompleteRun):
        check_run(tmp_path)
    publish_run(tmp_path, _writers("w4"), folders={"hf": _export("w4")})
    (tmp_path / "hf" / "model.safetensors").write_text("swapped")
    with pytest.raises(IncompleteRun, match="the export hf/ is missing or differs"):
        check_run(tmp_path)


def test_a_finished_run_counts_for_a_sweep_only_if_the_same_run_made_it(tmp_path: Path) -> None:
    """A sweep or tune trial folder finished by a smoke run, or by other overrides, is not taken as done."""
    from bitsmith.sweep import finished

    publish_run(tmp_path, _writers("a"), fingerprint="smoke-run")
    assert finished(tmp_path) and finished(tmp_path, "smoke-run")
    assert not finished(tmp_path, "real-run")


def test_a_second_run_into_a_folder_being_written_stops_in_one_line(tmp_path: Path) -> None:
    """Two runs into one --out: the second is refused while the first holds the folder (a killed run frees it)."""
    import fcntl

    from bitsmith.files import LOCK, run_lock

    with run_lock(tmp_path):
        with open(tmp_path / LOCK) as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel lock is held
        with pytest.raises(ValueError, match="another run is writing into this folder"), run_lock(tmp_path):
            pass
    with run_lock(tmp_path):  # released afterwards
        pass


def run_with_file_limit(args: list[str], limit: int) -> subprocess.CompletedProcess[str]:
    """``bitsmith ARGS`` where no file may grow past ``limit`` bytes (RLIMIT_FSIZE: the file system refuses
    more, as a full disk does; the signal that would kill the process ignored)."""

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "BITSMITH_QUIET": "1"}
    return subprocess.run([sys.executable, "-m", "bitsmith", *args], capture_output=True, text=True,
                          preexec_fn=limited, env=env, timeout=600)  # fmt: skip


@pytest.mark.parametrize(("recipe", "refused"), [("cnn-ptq-w8a8", "model.safetensors"), ("cnn-bsq", "train_state.pt")])
def test_a_full_disk_is_one_line_naming_the_file_and_the_space_and_publishes_nothing(
    recipe: str, refused: str, tmp_path: Path
) -> None:
    """PTQ's checkpoint (safetensors) and a training state (torch.save: "unexpected pos") hit a full disk: one
    line naming the file, the space it needed and what is left; no partial file, no manifest."""
    from test_recipe_cli import _has_data

    if not _has_data():
        pytest.skip("Fashion-MNIST not installed (make data)")
    out = tmp_path / "run"
    done = run_with_file_limit(["run", f"recipes/{recipe}.yaml", "--smoke", "--out", str(out), "export.deploy=none"],
                               40_000)  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and f"{refused}: could not be written: no space left for it (needs about" in errors[0]
    assert "MiB free there); free some space or choose another --out" in errors[0]
    assert not (out / MANIFEST).exists() and not list(out.glob(".*.tmp")) and not (out / "model.safetensors").exists()


def test_a_full_disk_while_exporting_a_folder_leaves_no_folder(tmp_path: Path) -> None:
    from bitsmith.files import DiskFull, atomic_folder

    def write(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    with pytest.raises(DiskFull, match=r"hf: .*no space left for it \(needs about 2\.0 MiB"):
        try:
            atomic_folder(tmp_path / "hf", write, needed=2 * 2**20)
        except DiskFull as exc:
            raise DiskFull(exc.errno, f"{Path(exc.filename).name}: {exc.strerror}") from None
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())
