"""Quantizers on llama.cpp's GGUF grids (``grid: q4_0 | q4_1 | q8_0 | q4_k | q6_k``): the parameters are the
file's own (fp16 scales; K-quants: 6-bit / int8 group scales against one fp16 scale per 256 weights), so the
written blocks, de-quantized by the ``gguf`` package (llama.cpp's arithmetic), are the model bitsmith optimised to
float32 rounding; GPTQ's error feedback runs on that grid."""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")  # the `llm` extra

from bitsmith import build_method, compress  # noqa: E402
from bitsmith.export.gguf_blocks import pack, unpack  # noqa: E402
from bitsmith.methods.llm.gptq import gptq_quantize  # noqa: E402
from bitsmith.quant.gguf_grid import GRIDS, fp16, super_scales  # noqa: E402
from bitsmith.quant.uniform import UniformQuantizer  # noqa: E402
from conftest import make_llama, token_batches  # noqa: E402
from test_llm import correlated_inputs  # noqa: E402


def grid_quantizer(name: str) -> UniformQuantizer:
    g = GRIDS[name]
    return UniformQuantizer(g.bits, g.symmetric, "group", group_size=g.group, float_zero=not g.symmetric, grid=name)


def weight(rows: int = 16, columns: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=g) * 0.05
    return w * torch.linspace(0.2, 3.0, columns // 32).repeat_interleave(32)  # groups of very different ranges


@pytest.mark.parametrize("name", list(GRIDS))
def test_the_written_blocks_are_the_quantized_weights_to_float32_rounding(name: str) -> None:
    w = weight()
    q = grid_quantizer(name).calibrate_(w)
    ours = q(w)
    tensor = pack("layer", q, w)
    assert tensor.qtype == gguf.GGMLQuantizationType[name.upper()]
    assert (unpack(tensor) - ours).abs().max() <= 1e-6 * ours.abs().max()
    g = GRIDS[name]
    assert tensor.data.nbytes * 8 / w.numel() == g.bits_per_weight  # llama.cpp's block size, scales included
    assert q.overhead_bits() / w.numel() + g.bits == g.bits_per_weight  # and bitsmith's size accounting


@pytest.mark.parametrize("name", ["q4_k", "q6_k"])
def test_k_quant_group_scales_lie_on_their_super_blocks_integer_levels(name: str) -> None:
    """Each group's scale is ``d * k``: fp16 ``d`` per 256 weights, integer ``k`` up to 63 (Q4_K) / 127 (Q6_K);
    plain min-max scales are not (the file could not hold them)."""
    g, w = GRIDS[name], weight()
    scale = grid_quantizer(name).calibrate_(w).scale
    d, k = super_scales(g, scale)
    assert torch.equal(fp16(d), d) and int(k.max()) == g.levels and int(k.min()) >= 1
    assert torch.equal((d * k).reshape(-1), scale)
    plain = UniformQuantizer(g.bits, g.symmetric, "group", group_size=g.group, float_zero=not g.symmetric)
    d, k = super_scales(g, plain.calibrate_(w).scale)
    assert not torch.allclose((d * k).reshape(-1), plain.scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["q4_0", "q4_k"])
def test_gptq_on_a_grid_lowers_the_output_error_and_stays_on_the_grid(name: str) -> None:
    """GPTQ's error feedback with the grid's own parameters: the layer's output error falls well below
    round-to-nearest on the same grid, and the result is exactly what the blocks store."""
    g = GRIDS[name]
    inputs = correlated_inputs(n=1024, d=512)
    w = weight(rows=32)
    hessian = 2 * inputs.T @ inputs / inputs.shape[0]
    values, params = gptq_quantize(w, hessian, g.bits, g.group, g.symmetric, 0.01, True, 128, g)
    rtn = grid_quantizer(name).calibrate_(w)(w)

    def error(v: torch.Tensor) -> float:
        return float((inputs @ (w - v).T).pow(2).mean())

    assert error(values) < 0.7 * error(rtn)
    q = grid_quantizer(name)
    q.scale, q.zero_point = params.scale.reshape(-1).clone(), params.zero.reshape(-1).clone()
    assert (q(values) - values).abs().max() <= 1e-6 * values.abs().max()  # the values are codes on the grid
    assert (unpack(pack("layer", q, values)) - values).abs().max() <= 1e-6 * values.abs().max()


def test_a_method_with_grid_sets_the_layers_and_refuses_widths_the_grid_cannot_split() -> None:
    model = make_llama()  # hidden 64: no multiple of 256
    compress(model, [build_method({"name": "gptq", "grid": "q4_1", "where": {"include": ["model.layers.*"]}})],
             token_batches(count=2, batch=2, length=16))  # fmt: skip
    q = model.model.layers[0].self_attn.q_proj.weight_q
    assert (q.grid.name, q.bits, q.group_size, q.symmetric) == ("q4_1", 4, 32, False)
    with pytest.raises(ValueError, match=r"grid q4_k: layer 'model.layers.0.self_attn.q_proj' has 64 inputs, not a "
                                         r"multiple of 256; grids that fit it: q8_0, q5_0, q5_1, q4_0, q4_1"):  # fmt: skip
        compress(
            make_llama(), [build_method({"name": "rtn", "grid": "q4_k", "where": {"include": ["model.layers.*"]}})]
        )


@pytest.mark.parametrize("name", ["q4_0", "q5_0"])
def test_rtn_on_q4_0_and_q5_0_is_llama_cpps_own_rounding(name: str) -> None:
    """llama.cpp's reference quantizer (the ``gguf`` package's copy) writes the same blocks as bitsmith's RTN on the
    grid: the signed scale ``max / -8`` (``-16``) that uses every level; bytes differ only where the two round a tie
    differently (``x * (1 / d)`` truncated after ``+ 8.5`` vs ``x / d`` rounded half to even)."""
    w = weight(rows=64)
    ours = pack("layer", grid_quantizer(name).calibrate_(w), w).data.reshape(-1)
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[name.upper()]).reshape(-1)
    assert (ours == theirs).mean() > 0.995
