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


def test_one_slow_run_among_ten_does_not_make_a_timing_unreliable() -> None:
    """The first demo on an idle machine: nine runs near 26 ms and one at 40.03 ms. The middle half of the runs
    agrees, so the timing stands (max / min is still reported); a spread-out middle half does not."""
    steady = [25.83, 25.9, 26.0, 26.1, 26.2, 26.3, 26.4, 26.6, 27.0, 40.03]
    one_slow = Timing.from_times(steady, 0.3, 2)
    assert one_slow.unreliable() is None and one_slow.max_ms == 40.03 and one_slow.min_ms == 25.83
    scattered = Timing.from_times([20.0, 22.0, 25.0, 28.0, 31.0, 34.0, 36.0, 38.0, 39.0, 40.0], 0.3, 2)
    assert "runs spread: middle half" in (scattered.unreliable() or "")
    old_record = {"min_ms": 25.83, "median_ms": 26.2, "max_ms": 40.03, "runs": 10, "load": 0.3, "cores": 2}
    assert "runs spread 25.83-40.03" in (Timing.from_dict(old_record).unreliable() or "")  # no quartiles kept
