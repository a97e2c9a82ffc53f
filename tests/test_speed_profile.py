"""The speed profile's op-by-op comparison: which ops a graph runs that the peer's does not."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from speed_profile import breakdown, extra_ops, fused_ops, kernel_name  # noqa: E402


def test_kernel_names_drop_graph_and_index() -> None:
    assert kernel_name("graph_0_cpp_fused_div_gelu_quantize_per_tensor_12") == "cpp_fused_div_gelu_quantize_per_tensor"
    assert kernel_name("onednn::qlinear_pointwise") == "onednn::qlinear_pointwise"


def test_fused_ops_reads_multi_word_ops() -> None:
    assert fused_ops("cpp_fused_add_mul_native_layer_norm_quantize_per_tensor_transpose_view") == [
        "add", "mul", "native_layer_norm", "quantize_per_tensor", "transpose", "view"]  # fmt: skip
    assert fused_ops("cpp_fused__scaled_dot_product_flash_attention_for_cpu__to_copy_add") == [
        "_scaled_dot_product_flash_attention_for_cpu", "_to_copy", "add"]  # fmt: skip


def test_extra_ops_names_what_only_ours_runs() -> None:
    peer = {"onednn::qlinear_pointwise": [36.0, 100.0], "cpp_fused_add_native_layer_norm_quantize_per_tensor": [6, 3.0],
            "aten::view": [40, 0.3]}  # fmt: skip
    ours = {"onednn::qlinear_pointwise": [24.0, 101.0], "cpp_fused_add_mul_native_layer_norm_quantize_per_tensor": [6, 3.2],
            "cpp_fused_mul_quantize_per_tensor_transpose": [6, 5.0], "aten::view": [60, 0.4]}  # fmt: skip
    extra = {op: (mine, theirs, ms) for op, mine, theirs, ms in extra_ops(ours, peer)}
    assert set(extra) == {"mul", "quantize_per_tensor"}  # fewer GEMMs, equal norms, layout ops: not listed
    assert extra["mul"] == (12, 0, 8.2)
    assert extra["quantize_per_tensor"] == (12, 6, 8.2)


def test_breakdown_groups_and_counts_compute_ops() -> None:
    ops = {"onednn::qlinear_pointwise": [24.0, 100.0], "aten::_scaled_dot_product_flash_attention_for_cpu": [6, 60.0],
           "cpp_fused_gelu": [6, 5.0], "aten::view": [30, 0.5]}  # fmt: skip
    row = breakdown(ops)
    assert (row["int8 GEMM / conv"], row["attention"], row["everything else"]) == (100.0, 60.0, 5.5)
    assert row["ops per forward"] == 36
