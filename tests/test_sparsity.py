"""Sparsity: DeepHoyer's regularisers, pruning masks, the prune and deephoyer methods."""

from __future__ import annotations

import pytest
import torch

from bitsmith import compress
from bitsmith.methods.sparse.deephoyer import DeepHoyer
from bitsmith.methods.sparse.prune import Prune
from bitsmith.methods.sparse.sparsity import (
    REGULARIZERS,
    group_hoyer_square,
    hoyer_square,
    magnitude_masks,
    nm_mask,
    sparsity_of,
    threshold_mask,
)
from bitsmith.train import TrainConfig, accuracy, fit
from conftest import make_cnn
from test_qat import toy_data


@pytest.mark.parametrize("regularizer", [hoyer_square, group_hoyer_square])
def test_hoyer_square_is_scale_invariant_and_never_shrinks_the_norm(regularizer) -> None:
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    assert float(regularizer(3.7 * w)) == pytest.approx(float(regularizer(w)), rel=1e-9)
    (grad,) = torch.autograd.grad(regularizer(w), w)
    assert abs(float((w * grad).sum())) < 1e-6  # w . grad HS(w) = 0
    assert float(hoyer_square(torch.tensor([0.0, 0.0, 5.0]))) == pytest.approx(1.0)  # one non-zero: HS = 1


def test_every_regulariser_is_finite_with_a_gradient() -> None:
    w = torch.randn(8, 4, requires_grad=True)
    for name, fn in REGULARIZERS.items():
        (grad,) = torch.autograd.grad(fn(w), w)
        assert torch.isfinite(grad).all(), name


def test_masks_hit_their_sparsity_and_patterns() -> None:
    torch.manual_seed(0)
    weights = {"a": torch.randn(32, 16), "b": 0.1 * torch.randn(64, 16)}
    glob, per_layer = magnitude_masks(weights, 0.75, "global"), magnitude_masks(weights, 0.75, "layer")
    total = sum(m.numel() for m in glob.values())
    assert sum(int((~m).sum()) for m in glob.values()) == round(0.75 * total)
    assert sparsity_of(glob["b"]) > sparsity_of(glob["a"])  # the small-weight layer loses more globally
    assert sparsity_of(per_layer["a"]) == sparsity_of(per_layer["b"]) == 0.75
    conv = torch.randn(8, 16, 3, 3)
    for w in (weights["a"], conv):
        mask = nm_mask(w, 2, 4)
        rows = mask if w.dim() == 2 else mask.permute(0, 2, 3, 1).reshape(-1, 16)
        assert (rows.reshape(rows.shape[0], -1, 4).sum(-1) == 2).all()
        values = (w if w.dim() == 2 else w.permute(0, 2, 3, 1).reshape(-1, 16)).abs().reshape(rows.shape[0], -1, 4)
        keep = rows.reshape(values.shape)
        kept_min = values.masked_fill(~keep, float("inf")).amin(-1)
        dropped_max = values.masked_fill(keep, -1.0).amax(-1)
        assert (kept_min >= dropped_max).all()  # the two largest of every group are kept
    with pytest.raises(ValueError, match="does not divide"):
        nm_mask(torch.randn(4, 6))
    w = torch.randn(1000)
    assert torch.equal(threshold_mask(w, 0.25), w.abs() > 0.25 * w.std())


def test_prune_one_shot_and_gradual_reach_the_target(calib: list) -> None:
    model = make_cnn()
    method = Prune(sparsity=0.6, scope="layer", where={"types": ["Linear"]})
    compress(model, method, calib)
    assert sparsity_of(model.fc1.mask) == pytest.approx(0.6, abs=1e-3)
    x, y = toy_data(128)
    model = make_cnn()
    gradual = Prune(sparsity=0.8, gradual=True, ramp=0.5)
    compress(model, gradual, [x[:32]], finalize=False)
    assert model.fc1.mask is None
    seen = []
    fit(model, x, y, TrainConfig(epochs=4, batch_size=32, lr=0.05), [gradual],
        callbacks=[lambda m, s: seen.append(round(sparsity_of(torch.cat([m.get_submodule(n).mask.flatten()
                                                                      for n in gradual._layers])), 3))])  # fmt: skip
    assert seen[0] == pytest.approx(0.8 * (1 - 0.5**3), abs=1e-3) and seen[1:] == [0.8, 0.8, 0.8]


def test_deephoyer_trains_prunes_to_exact_zeros_and_fine_tunes() -> None:
    x, y = toy_data(512)
    model = make_cnn()
    fit(model, x, y, TrainConfig(epochs=3, batch_size=32, optimizer="adamw", lr=1e-2, weight_decay=0))
    method = DeepHoyer(lam=1e-2, sensitivity=0.5, finetune_epochs=1, where={"types": ["Linear"]})
    compress(model, method, [x[:64]], finalize=False)
    fit(model, x, y, TrainConfig(epochs=4, batch_size=32, optimizer="adamw", lr=1e-2, weight_decay=0), [method])
    assert sparsity_of(model.fc1.mask) > 0.3
    assert torch.equal(model.fc1.masked_weight()[~model.fc1.mask], torch.zeros(int((~model.fc1.mask).sum())))
    assert accuracy(model, x, y) > 0.9
    assert float(method.penalty(model, (x[:8], y[:8]))) == 0.0  # fine-tuning: the regulariser is off


@pytest.mark.parametrize("quantize", [False, True])
def test_pruned_checkpoints_store_only_the_kept_weights(quantize: bool, tmp_path, calib: list) -> None:
    from bitsmith import load, model_cost, save
    from bitsmith.methods.ptq.ptq import PTQ

    model = make_cnn()
    methods = [Prune(sparsity=0.9, scope="layer"), *([PTQ(w_bits=4, a_bits=8)] if quantize else [])]
    compress(model, methods, calib)
    dense = make_cnn()
    compress(dense, [PTQ(w_bits=4, a_bits=8)] if quantize else [], calib)
    path, dense_path = save(model, tmp_path / "sparse.safetensors"), save(dense, tmp_path / "dense.safetensors")
    assert path.stat().st_size < dense_path.stat().st_size
    assert model_cost(model).totals["size_bytes"] < model_cost(dense).totals["size_bytes"]
    reloaded = load(path, make_cnn())
    x = calib[0][0]
    assert torch.equal(reloaded(x), model.eval()(x))


def test_regulariser_values_match_their_formulas() -> None:
    w = torch.tensor([3.0, -4.0, 0.0])
    assert float(REGULARIZERS["hoyer-square"](w)) == pytest.approx(49 / 25)  # (|3| + |4|)^2 / (9 + 16)
    assert float(REGULARIZERS["hoyer"](w)) == pytest.approx(7 / 5)
    assert float(REGULARIZERS["l1"](w)) == pytest.approx(7.0)
    m = torch.tensor([[3.0, 0.0], [4.0, 0.0]])  # input groups: column norms 5, 0; output groups: row norms 3, 4
    assert float(REGULARIZERS["group-hoyer-square"](m)) == pytest.approx(((5 + 0) ** 2 + (3 + 4) ** 2) / 25, rel=1e-5)


def test_deephoyer_penalty_is_lam_times_the_summed_regulariser(calib: list) -> None:
    model = make_cnn()
    method = DeepHoyer(lam=0.03, where={"types": ["Linear"]})
    compress(model, method, calib, finalize=False)
    expected = 0.03 * sum(float(REGULARIZERS["hoyer-square"](model.get_submodule(n).weight)) for n in ("fc1", "fc2"))
    assert float(method.penalty(model, calib[0])) == pytest.approx(expected, rel=1e-6)
