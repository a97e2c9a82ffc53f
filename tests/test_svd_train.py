"""SVD training: exact decomposition at init, energy rank cut, low-rank layers at the end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bitsmith import compress, load, save
from bitsmith.methods.sparse.svd_train import SVDLayer, SVDTraining
from bitsmith.nn import LowRankConv2d, LowRankLinear
from bitsmith.train import TrainConfig, accuracy, fit
from conftest import make_cnn
from test_qat import toy_data


@pytest.mark.parametrize("dense", [nn.Linear(12, 7), nn.Conv2d(3, 5, 3, padding=1, stride=2)])
def test_svd_layer_reproduces_the_dense_layer_and_starts_orthogonal(dense: nn.Module) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 12) if isinstance(dense, nn.Linear) else torch.randn(2, 3, 9, 9)
    layer = SVDLayer(dense)
    assert torch.allclose(layer(x), dense(x), atol=1e-5)
    assert float(layer.orthogonality()) < 1e-10
    with torch.no_grad():
        layer.s[1:] *= 1e-3  # one dominant singular value: a 1% energy cut keeps rank 1
    layer.cut(0.01)
    assert layer.rank == 1
    low = layer.low_rank()
    assert isinstance(low, (LowRankLinear, LowRankConv2d)) and low.rank == 1
    assert torch.allclose(low(x), layer(x), atol=1e-5)


def test_svd_training_lowers_the_rank_and_round_trips(tmp_path: Path) -> None:
    x, y = toy_data(512)
    model = make_cnn()
    fit(model, x, y, TrainConfig(epochs=3, batch_size=32, optimizer="adamw", lr=1e-2, weight_decay=0))
    method = SVDTraining(lam_s=0.05, energy=0.05, finetune_epochs=1, where={"exclude": ["@first"]})
    compress(model, method, [x[:64]], finalize=False)
    fit(model, x, y, TrainConfig(epochs=3, batch_size=32, optimizer="adamw", lr=5e-3, weight_decay=0), [method])
    ranks = method.ranks(model)
    assert sum(kept for kept, _ in ranks.values()) < sum(full for _, full in ranks.values())
    method.finalize(model)
    assert isinstance(model.fc1, LowRankLinear) and model.fc1.rank == ranks["fc1"][0]
    assert accuracy(model, x, y) > 0.9
    reloaded = load(save(model, tmp_path / "svd.safetensors"), make_cnn())
    assert torch.equal(reloaded(x[:8]), model.eval()(x[:8]))


def test_the_penalty_is_the_singular_value_sparsity_plus_the_orthogonality_term(calib: list) -> None:
    from bitsmith.methods.sparse.sparsity import REGULARIZERS

    model = make_cnn()
    method = SVDTraining(lam_s=0.2, lam_o=3.0, where={"types": ["Linear"]})
    compress(model, method, calib, finalize=False)
    layers = method.layers(model)
    with torch.no_grad():  # leave orthogonality, so both terms are non-zero
        for layer in layers.values():
            layer.u.mul_(1.1)
    sparsity = sum(float(REGULARIZERS["hoyer"](layer.s)) for layer in layers.values())
    orthogonality = sum(float(layer.orthogonality()) for layer in layers.values())
    assert orthogonality > 0
    assert float(method.penalty(model, calib[0])) == pytest.approx(0.2 * sparsity + 3.0 * orthogonality, rel=1e-5)
    method.cut(model)  # after the cut only the orthogonality term remains
    assert float(method.penalty(model, calib[0])) == pytest.approx(3.0 * orthogonality, rel=1e-5)
