"""The training loop: resumable from its atomic per-epoch checkpoint, clear errors on bad state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bitsmith.train import TrainConfig, TrainState, fit


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 10, generator=gen)
    return x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()


CFG = TrainConfig(epochs=4, batch_size=32, optimizer="adamw", lr=1e-2, warmup_epochs=0.5)


class Interrupt(Exception):
    pass


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path: Path) -> None:
    reference = make_model()
    history = fit(reference, *data(), CFG)

    def kill_during_epoch_3(model: nn.Module, state: TrainState) -> None:
        if state.epoch == 3:  # dies after epoch 3's work, before its checkpoint: epoch 3 is redone
            raise Interrupt

    checkpoint = tmp_path / "state.pt"
    interrupted = make_model()
    with pytest.raises(Interrupt):
        fit(interrupted, *data(), CFG, checkpoint=checkpoint, callbacks=[kill_during_epoch_3])
    assert checkpoint.is_file() and not list(tmp_path.glob(".state.pt.*"))  # no temp files left behind
    resumed = make_model()  # a fresh process: the weights come from the checkpoint
    resumed_history = fit(resumed, *data(), CFG, checkpoint=checkpoint)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed_history == history


def test_corrupt_training_checkpoint_names_the_file_and_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "state.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="state.pt: cannot resume.*delete it"):
        fit(make_model(), *data(), CFG, checkpoint=bad)


def test_nan_data_and_a_diverging_loss_stop_with_advice() -> None:
    x, y = data()
    x[5, 3] = float("nan")
    with pytest.raises(
        ValueError, match=r"training data batch 0, inputs: 1 non-finite value\(s\), the first nan at \(5, 3\)"
    ):
        fit(make_model(), x, y, TrainConfig(epochs=1, batch_size=256))
    with pytest.raises(FloatingPointError, match=r"loss became (nan|inf) at epoch 1, step \d+ \(.*\); lower the lr"):
        fit(make_model(), *data(), TrainConfig(epochs=1, batch_size=16, optimizer="sgd", lr=1e30))
