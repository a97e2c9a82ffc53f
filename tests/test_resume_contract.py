"""Contract: every registered method that trains resumes bit-identically from a run killed after any epoch.

A new method is covered by registering it. ``RESUME_CONFIG`` gives settings under which every epoch of a
three-epoch toy run does its part (precision changes, pruning, cuts, the fine-tune), so a state the
resumed run fails to restore changes the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import bitsmith.train
from bitsmith import METHODS, build_method, compress
from bitsmith.train import TrainConfig, fit
from conftest import make_cnn
from test_methods_contract import MODELS

RESUME_CONFIG: dict[str, dict[str, Any]] = {
    "bsq": {"alpha": 1.0, "finetune_epochs": 1},
    "msq": {"alpha": 0.005, "finetune_epochs": 1, "adjust_steps": 2, "hessian_batch": 8, "probes": 4},
    "csq": {"lam": 0.1, "target_bits": 2.0},
    "deephoyer": {"finetune_epochs": 1},
    "svd-train": {"finetune_epochs": 1, "energy": 0.2},
    "prune": {"gradual": True, "sparsity": 0.6},
    "nvit": {"interval": 2, "per_step": 2, "macs_target": 0.6, "min_units": {"emb": 4, "qk": 2, "v": 2, "mlp": 4}},
    "distill-qat": {"features": ["conv"], "representation": "fc1"},
}
TRAINING = [name for name in METHODS.names() if METHODS.get(name).trains()]
EPOCHS = 3
CFG = TrainConfig(epochs=EPOCHS, batch_size=16, optimizer="sgd", lr=0.05, weight_decay=5e-4, warmup_epochs=0.5)


class Killed(Exception):
    pass


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.rand(48, 1, 12, 12, generator=gen), torch.randint(0, 10, (48,), generator=gen)


def prepared(name: str) -> tuple[torch.nn.Module, Any]:
    model, method = MODELS.get(name, make_cnn)(), build_method({"name": name, **RESUME_CONFIG.get(name, {})})
    images, labels = data()
    compress(model, method, [(images[:16], labels[:16])], finalize=False)
    return model, method


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested plain data and tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def test_every_training_method_is_covered() -> None:
    assert {"bsq", "msq", "csq", "deephoyer", "svd-train", "prune", "nvit", "qat", "hero"} <= set(TRAINING)


@pytest.mark.parametrize("killed_after", range(1, EPOCHS))
@pytest.mark.parametrize("name", TRAINING)
def test_a_run_killed_after_any_epoch_resumes_bit_identically(
    name: str, killed_after: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, method = prepared(name)
    history = fit(reference, *data(), CFG, [method])
    reference_state = method.state_dict()
    method.finalize(reference)

    save = bitsmith.train.save_training_state

    def save_then_die(path, model, optimizer, state, *rest) -> None:  # type: ignore[no-untyped-def]
        save(path, model, optimizer, state, *rest)
        if state.epoch == killed_after:
            raise Killed

    checkpoint = tmp_path / "state.pt"
    monkeypatch.setattr(bitsmith.train, "save_training_state", save_then_die)
    killed, killed_method = prepared(name)
    with pytest.raises(Killed):
        fit(killed, *data(), CFG, [killed_method], checkpoint=checkpoint)
    monkeypatch.setattr(bitsmith.train, "save_training_state", save)

    resumed, resumed_method = prepared(name)  # a fresh process: model and method come from the checkpoint
    assert fit(resumed, *data(), CFG, [resumed_method], checkpoint=checkpoint) == history
    assert same(resumed_method.state_dict(), reference_state), f"{name}: method state differs after resume"
    resumed_method.finalize(resumed)
    assert same(resumed.state_dict(), reference.state_dict()), f"{name}: model differs after resume"
    images = data()[0][:8]
    assert torch.equal(resumed.eval()(images), reference.eval()(images))
