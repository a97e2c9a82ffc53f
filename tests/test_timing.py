"""Timings carry their spread and load; a busy machine or scattered runs never yield a stated speed-up; a
deployment in which nothing runs in integer kernels says so."""

from __future__ import annotations

import pytest
import torch

from bitsmith import build_method, compress
from bitsmith.cli_eval import integer_kernels
from bitsmith.eval.latency import Timing, speedup, time_forward
from bitsmith.eval.report import timing_lines
from conftest import make_cnn


def timing(median: float, spread: float = 1.0, load: float | None = 0.2) -> Timing:
    return Timing(median / spread**0.5, median, median * spread**0.5, 10, load, 2)


def test_a_speedup_is_stated_only_for_reliable_timings() -> None:
    assert speedup(timing(4.0), timing(2.0)) == "2.00x"
    busy = speedup(timing(4.0, load=5.3), timing(2.0))
    assert busy.startswith("speed-up not stated") and "load average 5.3 on 2 cores" in busy
    scattered = speedup(timing(4.0), timing(2.0, spread=3.0))
    assert scattered.startswith("speed-up not stated") and "runs spread" in scattered


def test_time_forward_records_spread_and_load() -> None:
    result = time_forward(make_cnn(), torch.rand(4, 1, 12, 12), runs=3, warmup=1)
    assert result.min_ms <= result.median_ms <= result.max_ms and result.runs == 3 and result.cores >= 1
    assert set(result.to_dict()) >= {"min_ms", "median_ms", "max_ms", "load", "unreliable"}
    with pytest.raises(ValueError, match="runs must be >= 1"):
        time_forward(make_cnn(), torch.rand(4, 1, 12, 12), runs=0)


def test_the_report_flags_unreliable_timings_and_float_only_deployments() -> None:
    side = {"timing": timing(3.0, load=6.0).to_dict()}
    report = {"baseline": side, "compressed": side, "deployed": {**side, "integer_layers": 0}}
    text = "\n".join(timing_lines(report))
    assert "**Timing unreliable**" in text and "load average 6.0" in text
    assert "**Nothing runs in integer kernels**" in text
    calm = {"timing": timing(3.0).to_dict()}
    assert "unreliable" not in "\n".join(timing_lines({"baseline": calm, "compressed": calm}))


def test_a_deployment_says_how_much_runs_in_integer_kernels() -> None:
    pytest.importorskip("onnxruntime")
    from bitsmith.deploy import deploy

    example = torch.rand(4, 1, 12, 12)
    assert deploy(make_cnn(), example, "onnxruntime").integer_layers == 0
    model = make_cnn()
    compress(model, build_method({"name": "ptq", "w_bits": 8, "a_bits": 8}), [torch.rand(8, 1, 12, 12)])
    assert deploy(model, example, "onnxruntime").integer_layers == 4
    assert integer_kernels({"integer_layers": 0, "fallbacks": {}}) == "nothing quantized: it runs in float"
    assert integer_kernels({"integer_layers": 0, "fallbacks": {"fc": "w3"}}).startswith("every quantized layer fell")
