"""The zoo: the shipped checkpoint, `bitsmith train` (no retraining unless --force), an announced and
resumable first training, progress lines without a terminal."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import bitsmith.zoo as zoo
from bitsmith import train
from bitsmith.cli import main
from bitsmith.train import TrainConfig
from conftest import TinyCNN


@pytest.fixture
def tiny_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A zoo entry 'tiny' (2 epochs of a tiny CNN on 64 random images), cached under tmp_path."""
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path))
    entry = zoo.ZooModel("tiny", "test model", TinyCNN, TrainConfig(epochs=2, batch_size=16, lr=0.01))
    monkeypatch.setitem(zoo.ZOO, "tiny", entry)
    gen = torch.Generator().manual_seed(0)
    data = (torch.rand(64, 1, 12, 12, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    monkeypatch.setattr(zoo, "load_fashion_mnist", lambda split, root=None: data)
    return "tiny"


class Interrupt(Exception):
    pass


def test_first_training_is_announced_with_an_estimate_and_resumes(
    tiny_zoo: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bitsmith")
    reference, _ = zoo.train_zoo_model(tiny_zoo)
    assert "training tiny first: 2 epochs on 64 images, about" in caplog.text
    assert "epoch 1/2: loss" in caplog.text and "left" in caplog.text  # a line per epoch, terminal or not
    zoo.cache_path(tiny_zoo).unlink()

    real_save = train.save_training_state

    def killed_after_epoch_1(path, model, optimizer, state, *args):  # kill -9 right after epoch 1 was saved
        real_save(path, model, optimizer, state, *args)
        if state.epoch == 1:
            raise Interrupt

    monkeypatch.setattr(train, "save_training_state", killed_after_epoch_1)
    with pytest.raises(Interrupt):
        zoo.train_zoo_model(tiny_zoo)
    state = zoo.cache_path(tiny_zoo).with_suffix(".train_state.pt")
    assert state.is_file() and not zoo.cache_path(tiny_zoo).exists()
    monkeypatch.setattr(train, "save_training_state", real_save)
    caplog.clear()
    resumed, _ = zoo.train_zoo_model(tiny_zoo)
    assert "epoch 1/2" not in caplog.text and "epoch 2/2" in caplog.text  # epoch 1 was not trained again
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not state.exists()


def test_train_does_not_retrain_a_cached_model_unless_forced(
    tiny_zoo: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = zoo.train_zoo_model
    monkeypatch.setattr(zoo, "train_zoo_model", lambda name, root=None: calls.append(name) or real(name, root))
    assert main(["train", tiny_zoo]) == 0 and calls == ["tiny"]
    assert main(["train", tiny_zoo]) == 0 and calls == ["tiny"]
    assert "--force trains it again" in capsys.readouterr().out
    assert main(["train", tiny_zoo, "--force"]) == 0 and calls == ["tiny", "tiny"]


def test_the_shipped_cnn_is_used_when_nothing_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path))
    assert zoo.checkpoint_path("cnn") == zoo.packaged_path("cnn") and zoo.packaged_path("cnn").is_file()
    assert zoo.recorded_accuracy("cnn") > 0.9
    model = zoo.pretrained("cnn", train_if_missing=False)
    assert sum(p.numel() for p in model.parameters()) > 70_000


def test_version_and_quiet_dependencies(capsys: pytest.CaptureFixture) -> None:
    import subprocess
    import sys

    from bitsmith import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"bitsmith {__version__}"
    pytest.importorskip("torchao")
    code = "from bitsmith.cli import quiet_dependencies; quiet_dependencies({}); import torchao"
    quiet = subprocess.run([sys.executable, "-c", code.format(False)], capture_output=True, text=True, check=True)
    assert "Failed to load" not in quiet.stderr and "W1" not in quiet.stderr  # torchao's .so lines, torch's W-lines
    loud = subprocess.run([sys.executable, "-c", code.format(True)], capture_output=True, text=True, check=True)
    assert len(loud.stderr) >= len(quiet.stderr)  # --debug shows what the dependencies say


def test_sentiment_sentences_are_read_and_split_by_rating(tmp_path, monkeypatch) -> None:
    from bitsmith.zoo.sentiment import rated_sentences, sentiment_split

    folder = tmp_path / "vader-sentiment"
    folder.mkdir()
    lines = ["1\t2.5\tA fine film.", "2\t-1.2\tDull.", "3\t0\tNeutral.", "bad line", "4\tx\tno rating", "5\t0.3\tOkay."]
    (folder / "movieReviewSnippets_GroundTruth.txt").write_text("\r\n".join(lines))
    monkeypatch.setenv("BITSMITH_TEXT", str(tmp_path))
    assert rated_sentences() == [("A fine film.", 2.5), ("Dull.", -1.2), ("Neutral.", 0.0), ("Okay.", 0.3)]
    train, test = sentiment_split(test_fraction=0.34)
    assert sorted(train + test) == [("A fine film.", 1), ("Dull.", 0), ("Okay.", 1)]
    with pytest.raises(ValueError, match="unknown sentiment collection"):
        rated_sentences("poems")


def test_a_data_root_without_data_is_an_error_not_a_fall_back(tmp_path: Path) -> None:
    """An existing folder that holds no Fashion-MNIST files is refused in one line (it used to fall back to
    Debian's copy silently)."""
    from bitsmith.zoo.data import fashion_mnist_dir

    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(FileNotFoundError, match=f"data.root {tmp_path}: no Fashion-MNIST idx files there"):
        fashion_mnist_dir(tmp_path)
