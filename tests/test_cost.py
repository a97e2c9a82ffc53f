"""Cost accounting on hand-computed layers."""

from __future__ import annotations

import torch
from torch import nn

from bitsmith import QLinear, model_cost
from bitsmith.quant import UniformQuantizer


def test_float_linear_and_conv_costs() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(27, 4), nn.LayerNorm(4))
    report = model_cost(model, torch.randn(1, 2, 5, 5))
    conv, linear = report.layers
    assert (conv.params, conv.macs) == (54, 27 * 18)  # 3x3x3 outputs, 2*3*3 MACs each
    assert (linear.params, linear.macs) == (108, 4 * 27)
    assert conv.size_bits == (54 + 3) * 32 and linear.size_bits == (108 + 4) * 32
    assert report.other_params == 8 and report.other_bits == 8 * 32  # LayerNorm weight + bias
    assert report.totals["params"] == 54 + 3 + 108 + 4 + 8
    assert report.totals["size_bytes"] == (57 + 112 + 8) * 4
    assert report.totals["bops"] == (27 * 18 + 4 * 27) * 32 * 32
    assert report.totals["avg_weight_bits"] == 32.0


def test_quantized_linear_cost_counts_codes_scales_zero_points_mask() -> None:
    linear = nn.Linear(4, 3)
    layer = QLinear.from_float(
        linear,
        weight_q=UniformQuantizer(4, symmetric=True, granularity="channel").calibrate_(linear.weight),
        input_q=UniformQuantizer(8, symmetric=False).calibrate_(torch.randn(10, 4)),
    )
    report = model_cost(nn.Sequential(layer), torch.randn(2, 4))
    (cost,) = report.layers
    # 12 codes x 4 bits + 3 fp32 scales (symmetric: no zero points) + 3 fp32 biases + input scale and 8-bit zero point
    assert cost.size_bits == 12 * 4 + 3 * 32 + 3 * 32 + (32 + 8)
    assert (cost.weight_bits, cost.act_bits, cost.macs) == (4.0, 8, 24)
    assert cost.bops == 24 * 4 * 8
    layer.set_mask(torch.ones(3, 4, dtype=torch.bool))
    assert model_cost(nn.Sequential(layer)).layers[0].size_bits == cost.size_bits + 12


def test_average_bits_weighted_by_parameters() -> None:
    small, big = nn.Linear(2, 2, bias=False), nn.Linear(8, 8, bias=False)
    q_small = QLinear.from_float(small, weight_q=UniformQuantizer(8).calibrate_(small.weight))
    q_big = QLinear.from_float(big, weight_q=UniformQuantizer(2).calibrate_(big.weight))
    report = model_cost(nn.Sequential(q_small, nn.Linear(2, 8, bias=False), q_big))
    assert report.totals["avg_weight_bits"] == (4 * 8 + 16 * 32 + 64 * 2) / 84


def test_sign_magnitude_layers_store_one_bit_more_than_their_precision() -> None:
    from bitsmith.quant import BitPlaneQuantizer

    linear = nn.Linear(8, 4)
    layer = QLinear.from_float(linear, weight_q=BitPlaneQuantizer(3).calibrate_(linear.weight), input_q=None)
    totals = model_cost(nn.Sequential(layer)).totals
    assert (totals["avg_weight_bits"], totals["avg_code_bits"]) == (3.0, 4.0)
    assert model_cost(nn.Sequential(nn.Linear(8, 4))).totals["avg_code_bits"] == 32.0


def test_embedding_tables_count_in_bits_and_bops_ignore_padding() -> None:
    from bitsmith.eval.tasks import EmbeddingTask

    model = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 8))
    cost = model_cost(model, torch.zeros(1, 5, dtype=torch.long)).totals
    assert cost["avg_weight_bits"] == 32 and cost["params"] == 100 * 8 + 8 * 8 + 8  # the table is a weight layer
    short = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    padded = {"input_ids": torch.tensor([[5, 6, 7, 0, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0]])}
    cut = EmbeddingTask.first(None, padded)  # type: ignore[arg-type]
    assert all(torch.equal(cut[key], short[key]) for key in short)


def test_pruned_layers_report_their_sparsity() -> None:
    from bitsmith.eval.report import headline, metrics_table

    model = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight[:4] = 0
    totals = model_cost(model).totals
    assert totals["sparsity"] == 0.5
    base = {"accuracy": 0.9, "size_bytes": 1000, "avg_weight_bits": 32.0, "sparsity": 0.0}
    comp = {**base, "sparsity": totals["sparsity"]}
    assert headline(base, comp).endswith("zero weights 50.0%")
    assert "zero weights %" in metrics_table([("a", base), ("b", comp)])
    assert "zero weights %" not in metrics_table([("a", base), ("b", base)])
