"""QAT baselines: STE and LSQ train through their quantizers, end on the grid and round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitsmith import compress, load, save
from bitsmith.methods.qat import QAT
from bitsmith.train import TrainConfig, accuracy, fit
from conftest import make_cnn


def toy_data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(n, 1, 12, 12, generator=gen), torch.randint(0, 2, (n,), generator=gen)
    x[y == 1, :, :6] += 0.5  # class 1: a brighter top half
    return x, y


@pytest.mark.parametrize("step", ["ste", "lsq"])
def test_qat_trains_through_the_quantizers_and_stays_on_the_grid(step: str, tmp_path: Path) -> None:
    model = make_cnn()
    x, y = toy_data(512)
    method = QAT(w_bits=3, a_bits=8, step=step)
    compress(model, method, [x[:64]])
    assert model.stem.input_q.symmetric is False  # images are non-negative: unsigned codes
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("scale")}
    assert (len(before) > 0) == (step == "lsq")
    fit(model, x, y, TrainConfig(epochs=6, batch_size=32, optimizer="adamw", lr=1e-2, weight_decay=0), [method])
    assert accuracy(model, x, y) > 0.9
    for name, value in before.items():  # LSQ learned its steps
        assert not torch.equal(value, dict(model.named_parameters())[name]), name
    weight = model.fc1.effective_weight().detach()
    assert all(len(row.unique()) <= 8 for row in weight)  # 3 bits per output channel
    reloaded = load(save(model, tmp_path / "qat.safetensors"), make_cnn())
    assert torch.equal(reloaded(x[:8]), model.eval()(x[:8]))
