"""PTQ's ``residual_adds``: both inputs of each residual add on the activation grid, so ONNX Runtime runs a
ResNet's convolutions and adds on 8-bit codes (``QLinearConv``, ``QLinearAdd``); or the shortcut only, so oneDNN
fuses each add into the convolution before it. Both still match the fake-quant model."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from torch import nn

from bitsmith import compress
from bitsmith.export.checkpoint import load, save
from bitsmith.methods.ptq.ptq import PTQ
from bitsmith.nn import QInput, QOutput
from bitsmith.zoo.vision import ResNetCNN
from conftest import EXACT_W_BITS, make_cnn
from test_onnx_export import cosine

ADD_INPUTS = {"layer1.bn2", "layer1.shortcut", "layer2.bn2", "layer2.shortcut.1", "layer3.bn2", "layer3.shortcut.1"}


def make_resnet(seed: int = 0) -> nn.Module:
    """The zoo CNN's architecture at widths 4 / 8 / 8, with batch norms that do something."""
    torch.manual_seed(seed)
    model = ResNetCNN((4, 8, 8))
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)
    return model.eval()


def quantized(calib: list, residual_adds: str = "both", w_bits: int = 8, pool_inputs: bool = False) -> nn.Module:
    model = make_resnet()
    compress(model, PTQ(w_bits=w_bits, a_bits=8, residual_adds=residual_adds, pool_inputs=pool_inputs), calib)
    return model


def test_both_inputs_of_every_residual_add_are_put_on_a_grid(calib: list, images: torch.Tensor) -> None:
    model = quantized(calib)
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, QOutput)}
    assert set(wrapped) == ADD_INPUTS
    seen = {}
    for name, module in wrapped.items():
        module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (m.quantizer, out)))
    with torch.no_grad():
        out = model(images)
    for q, value in seen.values():  # what reaches the add is on the output quantizer's 8-bit grid
        codes = value / q.scale + q.zero_point
        assert torch.allclose(codes, codes.round(), atol=1e-3) and int(codes.round().max()) <= 255
    with torch.no_grad():
        assert not torch.allclose(out, quantized(calib, residual_adds="none")(images))


def test_a_model_without_residual_adds_is_left_alone_with_a_warning(calib: list) -> None:
    model = make_cnn()
    with pytest.warns(UserWarning, match="residual_adds found no add"):
        compress(model, PTQ(w_bits=8, a_bits=8, residual_adds="both"), calib)
    assert not any(isinstance(m, QOutput) for m in model.modules())
    with pytest.raises(ValueError, match="residual_adds and pool_inputs quantize activations statically"):
        compress(make_cnn(), PTQ(w_bits=8, a_bits=None, residual_adds="both"), calib)


def test_the_output_quantizers_survive_a_checkpoint(calib: list, images: torch.Tensor, tmp_path: Path) -> None:
    model = quantized(calib)
    save(model, tmp_path / "model.safetensors")
    again = load(tmp_path / "model.safetensors", ResNetCNN((4, 8, 8)).eval())
    assert {name for name, m in again.named_modules() if isinstance(m, QOutput)} == ADD_INPUTS
    with torch.no_grad():
        assert torch.equal(again(images), model(images))


def onnx_runtime_ops(path: Path, tmp_path: Path) -> collections.Counter:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def test_onnx_runtime_runs_every_convolution_and_two_adds_on_8_bit_codes(
    calib: list, images: torch.Tensor, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    from bitsmith.export.onnx import OnnxRuntimeModel, export_onnx

    model = quantized(calib, w_bits=EXACT_W_BITS)
    export_onnx(model, images, tmp_path / "model.onnx")
    ops = onnx_runtime_ops(tmp_path / "model.onnx", tmp_path)
    # 9 convolutions (stem, 2 per block, 2 projection shortcuts), all integer; the last add feeds the float
    # global pool, so it stays float (ONNX Runtime's own static flow quantizes the pool too)
    assert ops["QLinearConv"] == 9 and ops["Conv"] + ops["FusedConv"] == 0
    assert ops["QLinearAdd"] == 2 and ops["Add"] == 1
    runtime = OnnxRuntimeModel(tmp_path / "model.onnx", threads=1)
    with torch.no_grad():
        assert cosine(runtime(images), model(images)) > 0.9999
        assert torch.equal(runtime(images).argmax(1), model(images).argmax(1))
    export_onnx(quantized(calib, residual_adds="none"), images, tmp_path / "plain.onnx")
    plain = onnx_runtime_ops(tmp_path / "plain.onnx", tmp_path)
    assert plain["QLinearConv"] < 9 and plain["QLinearAdd"] == 0  # without: the convolutions before adds stay float


def test_one_tensor_has_one_quantize_step_in_the_file(calib: list, images: torch.Tensor, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from bitsmith.export.onnx import export_onnx

    export_onnx(quantized(calib), images, tmp_path / "model.onnx")
    readers = collections.Counter(
        node.input[0] for node in onnx.load(str(tmp_path / "model.onnx")).graph.node if node.op_type == "QuantizeLinear"
    )
    # the stem's output feeds layer1.conv1 and the identity shortcut: two equal quantizers, one node
    assert readers and max(readers.values()) == 1


def test_quantized_shortcuts_let_onednn_fuse_each_add_into_its_convolution(
    calib: list, images: torch.Tensor, tmp_path: Path
) -> None:
    pytest.importorskip("torchao")
    from torch.profiler import ProfilerActivity, profile

    from bitsmith.deploy import deploy

    model = quantized(calib, "shortcut", w_bits=EXACT_W_BITS)
    assert {n for n, m in model.named_modules() if isinstance(m, QOutput)} == {
        "layer1.shortcut", "layer2.shortcut.1", "layer3.shortcut.1"
    }  # fmt: skip
    deployed = deploy(model, images, "torchao", tmp_path / "out", num_threads=1).model
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as run:
        out = deployed(images)
        assert cosine(out, model(images)) > 0.9999
    calls = collections.Counter(event.name for event in run.events())
    # each block's add (+ relu) runs inside its second convolution: oneDNN's binary post-op with an int8 shortcut
    assert calls["onednn::qconv2d_pointwise"] == 3 and calls["onednn::qconv_pointwise"] == 6


def test_a_quantized_pool_input_puts_the_last_add_and_the_pool_on_8_bit_codes(
    calib: list, images: torch.Tensor, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    from bitsmith.export.onnx import OnnxRuntimeModel, export_onnx

    model = quantized(calib, w_bits=EXACT_W_BITS, pool_inputs=True)
    assert [name for name, m in model.named_modules() if isinstance(m, QInput)] == ["pool"]
    export_onnx(model, images, tmp_path / "model.onnx")
    ops = onnx_runtime_ops(tmp_path / "model.onnx", tmp_path)
    assert ops["QLinearConv"] == 9 and ops["QLinearAdd"] == 3 and ops["Add"] == 0
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["GlobalAveragePool"] == 0
    runtime = OnnxRuntimeModel(tmp_path / "model.onnx", threads=1)
    with torch.no_grad():
        assert cosine(runtime(images), model(images)) > 0.9999
