"""Data-parallel training: two gloo processes on this CPU, each on half of every batch, end where one process
with the same global batch ends (up to the order of floating-point sums).

The tiny models lose their batch norm here: its statistics are per process by design (as under DDP without
``SyncBatchNorm``), which is stated in docs/scale.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bitsmith.train
from bitsmith import build_method, compress, distributed
from bitsmith.train import fit
from conftest import make_cnn
from test_methods_contract import MODELS
from test_resume_contract import CFG, RESUME_CONFIG, data

CHECKED = ["qat", "bsq", "nvit", "msq", "csq", "deephoyer", "prune"]  # deterministic: no random draws per step


def without_batchnorm(model: nn.Module) -> nn.Module:
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, nn.Identity())
    return model


def trained(
    name: str, checkpoint: Path | None = None, batchnorm: bool = False
) -> tuple[nn.Module, list[dict[str, Any]]]:
    model = MODELS.get(name, make_cnn)()
    model = model if batchnorm else without_batchnorm(model)
    method = build_method({"name": name, **RESUME_CONFIG.get(name, {})})
    images, labels = data()
    compress(model, method, [(images[:16], labels[:16])], finalize=False)
    history = fit(model, images, labels, CFG, [method], checkpoint=checkpoint)
    method.finalize(model)
    return model.eval(), history


class Killed(Exception):
    pass


def worker(rank: int, size: int, folder: str, names: list[str], die_after: int = 0, batchnorm: bool = False) -> None:
    """Train each method in ``size`` processes; rank 0 saves the result. ``die_after``: rank 0 dies after that
    epoch's checkpoint (the runs keep their training state in ``folder``). ``batchnorm``: the models keep it
    (per-process statistics)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous-{die_after}", rank=rank, world_size=size)
    save = bitsmith.train.save_training_state

    def save_then_die(path, model, optimizer, state, *rest) -> None:  # type: ignore[no-untyped-def]
        save(path, model, optimizer, state, *rest)
        if rank == 0:
            with open(Path(folder) / "saved-epochs.txt", "a") as record:
                record.write(f"{state.epoch} ")
        if state.epoch == die_after and rank == 0:
            raise Killed

    bitsmith.train.save_training_state = save_then_die
    try:
        assert distributed.world().size == size
        for name in names:
            model, history = trained(name, Path(folder) / f"{name}-state.pt", batchnorm)
            if rank == 0:
                torch.save({"state": model.state_dict(), "history": history}, Path(folder) / f"{name}.pt")
    finally:
        dist.destroy_process_group()


def close(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape:
            return False
        if a.is_floating_point():
            return torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        return torch.equal(a, b)
    if isinstance(a, float):
        return abs(a - b) <= 1e-5 * max(1.0, abs(a))
    return a == b


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(2, str(folder), CHECKED), nprocs=2)
    return folder


def assert_like_one_process(name: str, result: dict[str, Any]) -> None:
    model, history = trained(name)
    reference = model.state_dict()
    assert result["state"].keys() == reference.keys()
    for key, value in reference.items():
        assert close(result["state"][key], value), f"{name}: {key} differs between 2 processes and 1"
    for two, one in zip(result["history"], history, strict=True):
        assert all(close(two[k], one[k]) for k in one), f"{name}: epoch summaries differ: {two} vs {one}"


@pytest.mark.parametrize("name", CHECKED)
def test_two_processes_train_like_one_on_the_same_global_batch(name: str, two_processes: Path) -> None:
    assert_like_one_process(name, torch.load(two_processes / f"{name}.pt", weights_only=True))


def test_a_killed_two_process_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    with pytest.raises(mp.ProcessRaisedException, match="Killed"):
        mp.spawn(worker, args=(2, str(tmp_path), ["bsq"], 1), nprocs=2)
    assert (tmp_path / "bsq-state.pt").is_file() and not (tmp_path / "bsq.pt").exists()
    mp.spawn(worker, args=(2, str(tmp_path), ["bsq"]), nprocs=2)
    assert (tmp_path / "saved-epochs.txt").read_text().split() == ["1", "2", "3"]  # epoch 1 was not trained again
    assert_like_one_process("bsq", torch.load(tmp_path / "bsq.pt", weights_only=True))


def test_a_killed_two_process_run_resumes_bit_identically(tmp_path: Path) -> None:
    """With batch norm kept (statistics per process) and QAT's activation ranges (observed per process), a
    2-process run killed after epoch 1 and resumed ends bit-identical to the uninterrupted 2-process run:
    every process resumes its own state, not rank 0's."""
    (tmp_path / "whole").mkdir()
    (tmp_path / "resumed").mkdir()
    mp.spawn(worker, args=(2, str(tmp_path / "whole"), ["qat"], 0, True), nprocs=2)
    with pytest.raises(mp.ProcessRaisedException, match="Killed"):
        mp.spawn(worker, args=(2, str(tmp_path / "resumed"), ["qat"], 1, True), nprocs=2)
    mp.spawn(worker, args=(2, str(tmp_path / "resumed"), ["qat"], 0, True), nprocs=2)
    whole, resumed = (torch.load(tmp_path / f / "qat.pt", weights_only=True) for f in ("whole", "resumed"))
    differ = [k for k, v in whole["state"].items() if not torch.equal(v, resumed["state"][k])]
    assert not differ, f"{len(differ)} of {len(whole['state'])} tensors differ: {differ[:4]}"
    assert whole["history"] == resumed["history"]
    assert sorted(p.name for p in (tmp_path / "resumed").glob("qat-state*")) == [
        "qat-state.pt",
        "qat-state.rank1.epoch3.pt",
    ]


def test_a_rank_without_its_own_state_resumes_rank_zeros_and_says_so(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    from bitsmith.train import rank_state_path, state_of_rank

    path = tmp_path / "state.pt"
    torch.save({"epoch": 2}, path)
    assert state_of_rank(path, 0) == path
    with caplog.at_level("WARNING", logger="bitsmith"):
        assert state_of_rank(path, 1) == path  # killed between rank 1's write and rank 0's
    assert "no longer bit-identical" in caplog.text
    torch.save({"epoch": 2}, rank_state_path(path, 1, 2))
    assert state_of_rank(path, 1) == rank_state_path(path, 1, 2)


def test_a_batch_the_processes_cannot_share_equally_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size 15 is not a multiple of the 2 processes"):
        distributed.check_batch_size(15, 2)


def test_one_process_shard_is_the_whole_batch() -> None:
    x, y = torch.rand(6, 3), torch.arange(6)
    (sx, sy), weight = distributed.shard((x, y), distributed.World())
    assert sx is x and sy is y and weight == 1.0
    (sx, sy), weight = distributed.shard((x, y), distributed.World(rank=1, size=4))
    assert sy.tolist() == [2, 3] and weight == pytest.approx(2 / 6)


def test_environment_without_torchrun_is_one_process() -> None:
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"
    assert distributed.join_from_env() == distributed.World()


@pytest.mark.slow
def test_bitsmith_run_nproc_trains_a_real_recipe_in_two_processes(tmp_path: Path) -> None:
    """``bitsmith run --nproc 2`` on the BSQ recipe (smoke subsets): one report, written by rank 0."""
    command = [sys.executable, "-m", "bitsmith", "run", "recipes/cnn-bsq.yaml", "--out", str(tmp_path / "run"),
               "--smoke", "--nproc", "2"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "training in 2 processes" in done.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["training"] and report["compressed"]["metrics"]["accuracy"] > 0.1
    assert not (tmp_path / "run" / "train_state.pt").exists()


def test_nproc_on_a_recipe_that_does_not_train_says_so(tmp_path: Path) -> None:
    from bitsmith.cli import main

    assert main(["run", "recipes/cnn-ptq-w8a8.yaml", "--out", str(tmp_path), "--nproc", "2"]) == 2


def test_nproc_that_does_not_divide_the_batch_is_refused_before_launching(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from bitsmith.cli import main

    assert main(["run", "recipes/cnn-bsq.yaml", "--out", str(tmp_path), "--nproc", "3", "train.batch_size=128"]) == 2
    assert "batch_size 128 is not a multiple of the 3 processes" in capsys.readouterr().err


def test_more_processes_than_cores_are_refused_at_once(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import time

    from bitsmith.cli import main

    start = time.perf_counter()
    assert main(["run", "recipes/cnn-bsq.yaml", "--out", str(tmp_path), "--nproc", "64", "train.batch_size=128"]) == 2
    assert time.perf_counter() - start < 10 and "CPU core(s)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing started
