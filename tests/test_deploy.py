"""Deployment: the torchao (PT2E + Inductor) integer path, backend choice, errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from bitsmith import compress
from bitsmith.deploy import agreement, available_backends, deploy
from bitsmith.export.pt2e import pt2e_available
from bitsmith.export.qdq import deployable
from bitsmith.methods.ptq.ptq import PTQ
from bitsmith.methods.ptq.rtn import RTN
from conftest import EXACT_W_BITS, bert_batch, make_bert, make_cnn

pytest.importorskip("onnxruntime")
if not pt2e_available():
    pytest.skip("torchao's integer path needs torchao, an x86 CPU and a C++ compiler", allow_module_level=True)


def test_torchao_backend_runs_int8_kernels_and_matches_the_fake_quant_model(calib: list, images) -> None:
    from torch._dynamo.utils import counters

    model = make_cnn()
    compress(model, PTQ(w_bits=EXACT_W_BITS, a_bits=8), calib)
    counters.clear()
    deployment = deploy(model, images, "torchao", num_threads=1)
    lowered = {k: v for k, v in counters["inductor"].items() if k.endswith("_lower_count")}
    assert lowered.get("qconv_unary_lower_count", 0) + lowered.get("qlinear_unary_lower_count", 0) >= 3
    assert deployment.backend == "torchao" and deployment.fallbacks == {}
    plain, _ = deployable(model)  # the batch norm after the stem is folded into its convolution
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert agreement(deployment.model, model, images) > 0.9999
    bigger = torch.cat([images, images]).contiguous()  # another batch size compiles again, still int8
    assert agreement(deployment.model, model, bigger) > 0.9999


def test_auto_keeps_the_fastest_backend_it_timed(calib: list, images, tmp_path: Path) -> None:
    model = make_cnn()
    compress(model, PTQ(w_bits=8, a_bits=8), calib)
    deployment = deploy(model, images, "auto", tmp_path, num_threads=1)
    integer = {k: v for k, v in deployment.timings.items() if k != "float"}
    assert set(integer) == {"onnxruntime", "torchao"} == set(available_backends()) - {"torch"}
    assert deployment.backend == min(integer, key=integer.get) and deployment.timings["float"] > 0


def test_auto_says_so_when_every_integer_backend_is_slower_than_float(calib: list, images, monkeypatch) -> None:
    import bitsmith.deploy as module

    model = make_cnn()
    compress(model, PTQ(w_bits=8, a_bits=8), calib)
    from bitsmith.export.qdq import QDQLayer

    def latency(model, *args, **kwargs) -> float:  # stated, not timed: integer 5 ms, float 1 ms
        return 5.0 if any(isinstance(m, QDQLayer) for m in model.modules()) else 1.0

    monkeypatch.setattr(module, "available_backends", lambda: ["torch"])
    monkeypatch.setattr(module, "measure_latency", latency)
    with pytest.warns(UserWarning, match="auto: the fastest integer backend here, torch .* is slower than the model "
                                         "in float"):  # fmt: skip
        deployment = deploy(model, images, "auto", num_threads=1)
    assert deployment.timings == {"torch": 5.0, "float": 1.0}


def test_layers_without_an_integer_form_fall_back_with_a_warning(calib: list, images) -> None:
    model = make_cnn()
    compress(model, RTN(bits=4, group_size=8, where={"include": ["fc1"]}), calib)
    with pytest.warns(UserWarning, match="fc1 .*not uniform per-tensor"):
        deployment = deploy(model, images, "torch")
    assert list(deployment.fallbacks) == ["fc1"] and agreement(deployment.model, model, images) > 0.9999


def test_unknown_backend_is_a_clear_error(images) -> None:
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'; choose auto or one of"):
        deploy(make_cnn(), images, "tensorrt")


def test_a_cpu_without_vnni_is_named_when_8_bit_weights_would_saturate(calib: list, images, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import bitsmith.deploy

    monkeypatch.setattr(bitsmith.deploy, "int8_pairs_saturate", lambda: True)
    wide, narrow = make_cnn(), make_cnn()
    compress(wide, PTQ(w_bits=8, a_bits=8), calib)
    compress(narrow, PTQ(w_bits=7, a_bits=8), calib)
    with pytest.warns(UserWarning, match="no VNNI.*8-bit weights .4 layers.*w_bits: 7"):
        deploy(wide, images, "onnxruntime", tmp_path / "wide")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        deploy(narrow, images, "onnxruntime", tmp_path / "narrow")
    assert not [w for w in seen if "VNNI" in str(w.message)]


def test_torchao_runs_q_k_v_as_one_int8_gemm_per_layer_and_matches(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from torch.profiler import ProfilerActivity, profile

    from bitsmith.methods.ptq.smoothquant import SmoothQuant

    model, batch = make_bert(layers=2), bert_batch
    encoder = {"include": ["encoder.*"]}
    compress(model, [SmoothQuant(alpha=0.8, layers="all", where=encoder),
                     PTQ(w_bits=EXACT_W_BITS, a_bits=8, where=encoder)], [batch(8, 12, 1)])  # fmt: skip
    deployment = deploy(model, batch(4, 16, 2), "torchao", num_threads=1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        deployment.model(**batch(4, 16, 2))
    gemms = sum(e.count for e in prof.key_averages() if e.key == "onednn::qlinear_pointwise")
    assert gemms == 2 * 4  # per layer: q/k/v as one, attention output, fc1, fc2
    assert agreement(deployment.model, model, batch(3, 10, 5)) > 0.9999
