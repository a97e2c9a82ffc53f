"""PTQ, RTN and SmoothQuant: the configuration each method claims is the one its quantizers hold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsmith import build_method, compress
from conftest import bert_batch, make_bert


def linear_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 8), nn.ReLU(), nn.Linear(8, 4))


def test_rtn_is_asymmetric_per_group_min_max_by_default() -> None:
    model = linear_model()
    weight = model[0].weight.detach().clone()
    compress(model, build_method({"name": "rtn", "bits": 4, "group_size": 128, "where": {"include": ["0"]}}))
    q = model[0].weight_q
    assert q.scale.shape == (16,) and not q.symmetric  # 8 outputs x 2 groups of 128 inputs
    groups = weight.reshape(8, 2, 128)
    fake = q(weight).reshape(8, 2, 128)
    # asymmetric min-max: each group's step spans its own [min, max] in 15 steps, and it has at most 16 levels
    assert torch.allclose(q.scale.reshape(8, 2), (groups.amax(-1) - groups.amin(-1)) / 15, rtol=1e-5)
    assert float((fake - groups).abs().max()) <= float(q.scale.max()) / 2 + 1e-6
    assert max(len(g.unique()) for g in fake.reshape(16, 128)) <= 16
    assert int((q.zero_point != 0).sum()) > 0


def test_ptq_quantizes_weights_per_channel_and_calibrates_inputs() -> None:
    model = linear_model()
    calib = [torch.randn(16, 256) for _ in range(2)]
    ptq = build_method({"name": "ptq", "w_bits": 3, "a_bits": 4, "w_granularity": "channel"})
    compress(model, ptq, calib)
    layer = model[0]
    assert layer.weight_q.scale.numel() == 8  # one scale per output channel
    assert all(len(row.unique()) <= 8 for row in layer.effective_weight().detach())  # 3 bits per channel
    assert layer.input_q.ready
    assert len(layer.input_q(calib[0]).unique()) <= 16  # 4-bit inputs
    float_model = linear_model()
    assert not torch.equal(model(calib[0]), float_model(calib[0]))


def test_smoothquant_scales_are_max_activation_to_the_alpha_over_max_weight_to_one_minus_alpha() -> None:
    model = linear_model()
    weight = model[0].weight.detach().clone()
    calib = [torch.randn(32, 256) * torch.linspace(0.1, 20, 256) for _ in range(2)]
    alpha = 0.75
    compress(model, build_method({"name": "smoothquant", "alpha": alpha, "layers": "all"}), calib)
    a_max = torch.stack([x.abs().amax(0) for x in calib]).amax(0)
    expected = a_max.pow(alpha) / weight.abs().amax(0).pow(1 - alpha)
    assert torch.allclose(model[0].smooth, expected, rtol=1e-5)


def test_smoothquant_folds_the_attention_output_division_into_the_value_projection() -> None:
    pytest.importorskip("transformers")
    model, batch = make_bert(layers=1, seed=None), bert_batch(8, 12, seed=0)
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    smooth = build_method({"name": "smoothquant", "alpha": 0.8, "layers": "all", "where": {"include": ["encoder.*"]}})
    compress(model, smooth, [batch])
    layer = model.encoder.layer[0]
    assert layer.attention.output.dense.smooth is None  # no run-time division left
    assert smooth.report["encoder.layer.0.attention.output.dense"]["feeder"] == "encoder.layer.0.attention.self.value"
    assert layer.output.dense.smooth is not None  # after GELU: not foldable, the division stays
    with torch.no_grad():
        assert torch.allclose(model(**batch).last_hidden_state, before, atol=1e-4)


def test_smoothquant_outliers_keeps_a_run_time_division_only_where_an_input_channel_stands_out() -> None:
    pytest.importorskip("transformers")
    model, batch = make_bert(layers=2, seed=None), bert_batch(8, 12, seed=0)
    with torch.no_grad():  # layer 0's fc1 makes one GELU output channel 40x larger: an outlier fc2 must absorb
        model.encoder.layer[0].intermediate.dense.weight[3] *= 40.0
        model.encoder.layer[0].intermediate.dense.bias[3] = 40.0
        before = model(**batch).last_hidden_state
    smooth = build_method({"name": "smoothquant", "layers": "outliers", "outlier_ratio": 8.0,
                           "where": {"include": ["encoder.*"]}})  # fmt: skip
    compress(model, smooth, [batch])
    fc2 = [model.encoder.layer[i].output.dense for i in range(2)]
    ratios = [smooth.report[f"encoder.layer.{i}.output.dense"]["outlier_ratio"] for i in range(2)]
    assert ratios[0] >= 8.0 > ratios[1]
    assert fc2[0].smooth is not None and fc2[1].smooth is None  # the division stays where the outlier is
    assert model.encoder.layer[1].attention.output.dense.smooth is None  # folded into V, as with `all`
    with torch.no_grad():
        assert torch.allclose(model(**batch).last_hidden_state, before, atol=5e-3)  # float function unchanged


def test_rtn_refuses_a_group_that_does_not_divide_a_layer_unless_told_to_fall_back() -> None:
    with pytest.raises(ValueError, match=r"rtn: group_size 128 does not divide the 8 inputs of layer '2'"):
        compress(linear_model(), build_method({"name": "rtn", "bits": 4, "group_size": 128}))
    model = linear_model()
    with pytest.warns(UserWarning, match="using per-channel scales"):
        compress(model, build_method({"name": "rtn", "bits": 4, "group_size": 128, "per_channel_fallback": True}))
    assert model[2].weight_q.granularity == "channel" and model[0].weight_q.granularity == "group"
