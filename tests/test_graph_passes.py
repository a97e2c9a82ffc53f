"""The exported QDQ graph's clean-ups: q / k / v read one quantized input and run as one int8 GEMM, exactly."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from bitsmith import compress
from bitsmith.export.graph_passes import fuse_shared_input_linears, share_input_quantize
from bitsmith.export.pt2e import export_graph
from bitsmith.export.qdq import deployable
from bitsmith.methods.ptq.ptq import PTQ
from bitsmith.methods.ptq.smoothquant import SmoothQuant
from conftest import bert_batch, make_bert

pytest.importorskip("transformers")
LAYERS = 2

batch = bert_batch


@pytest.fixture(scope="module")
def graph() -> torch.fx.GraphModule:
    """A smoothed W8A8 two-layer BERT's exported QDQ graph (q / k / v: three copies of one smoothing and grid)."""
    model = make_bert(layers=LAYERS)
    encoder = {"include": ["encoder.*"]}
    compress(model, [SmoothQuant(alpha=0.8, layers="all", where=encoder), PTQ(w_bits=8, a_bits=8, where=encoder)],
             [batch(8, 12, 1)])  # fmt: skip
    plain, _ = deployable(model, ops="pt2e")
    module, _, _ = export_graph(plain, batch(2, 12, 2))
    return module


def count(graph: torch.fx.GraphModule, op: str) -> int:
    return Counter(str(n.target) for n in graph.graph.nodes if n.op == "call_function")[op]


def run(graph: torch.fx.GraphModule, example: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return graph(*example.values())


def test_q_k_v_share_one_quantize_step_and_run_as_one_gemm_with_the_same_output(graph) -> None:
    example = batch(3, 10, 5)
    expected = run(graph, example)
    cleaned = copy.deepcopy(graph)
    cleaned.graph.eliminate_dead_code()  # the unused pooler
    quantize, linear = "quantized_decomposed.quantize_per_tensor.default", "aten.linear.default"
    before = count(cleaned, quantize), count(cleaned, linear)
    share_input_quantize(cleaned)
    assert count(cleaned, quantize) == before[0] - 2 * LAYERS  # q / k / v: three quantize steps -> one
    assert fuse_shared_input_linears(cleaned) == 2 * LAYERS
    assert count(cleaned, linear) == before[1] - 2 * LAYERS
    assert torch.allclose(run(cleaned, example), expected, atol=1e-5)  # exact: the same codes, the same sums


def test_linears_on_differently_quantized_inputs_are_not_fused(graph) -> None:
    cleaned = copy.deepcopy(graph)  # without sharing, q / k / v read three (equal-valued) quantized tensors
    assert fuse_shared_input_linears(cleaned) == 0
