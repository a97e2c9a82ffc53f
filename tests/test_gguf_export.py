"""bitsmith's grouped weights written as llama.cpp blocks (Q8_0, Q4_0, Q4_1) and read back with the ``gguf``
package's de-quantization: the codes bitsmith chose, byte-exact, with only the scales rounded to fp16."""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")  # the `llm` extra

from bitsmith.export.gguf_blocks import check_round_trip, gguf_type, pack, unpack  # noqa: E402
from bitsmith.quant.uniform import UniformQuantizer  # noqa: E402

CASES = [(8, True, False, 32, "Q8_0"), (4, True, False, 32, "Q4_0"), (4, True, False, 128, "Q4_0"),
         (4, False, False, 64, "Q4_1"), (4, False, True, 32, "Q4_1")]  # fmt: skip


def weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(48, 256, generator=g) * 0.05 + 0.01 * torch.randn(48, 1, generator=g)


@pytest.mark.parametrize(("bits", "symmetric", "float_zero", "group", "kind"), CASES)
def test_the_file_holds_bitsmiths_codes_with_fp16_scales(bits: int, symmetric: bool, float_zero: bool, group: int,
                                                          kind: str) -> None:  # fmt: skip
    """llama.cpp's de-quantization of the written blocks equals bitsmith's codes times its fp16-rounded scales
    (exactly for the symmetric types), and stays within the fp16 bound of the model as optimised."""
    w = weight()
    q = UniformQuantizer(bits, symmetric, "group", group_size=group, float_zero=float_zero).calibrate_(w)
    tensor = pack("layer", q, w)
    assert tensor.qtype == gguf.GGMLQuantizationType[kind]
    enc = q.encode(w)
    scale16 = enc.params["scale"].to(torch.float16).float().repeat_interleave(group).reshape(w.shape)
    if symmetric:
        assert torch.equal(unpack(tensor), enc.codes.float() * scale16)
    else:
        zero = enc.params["zero_point"].repeat_interleave(group).reshape(w.shape)
        assert torch.allclose(unpack(tensor), (enc.codes.float() - zero) * scale16, atol=2e-3 * float(w.abs().max()))
    assert check_round_trip("layer", q, w, tensor) < 2e-3


def test_a_damaged_block_fails_the_round_trip_check() -> None:
    w = weight()
    q = UniformQuantizer(4, True, "group", group_size=32).calibrate_(w)
    tensor = pack("layer", q, w)
    tensor.data[3, 5] ^= 0x11  # two codes of one block changed
    with pytest.raises(ValueError, match="layer 'layer' written as Q4_0 differs from bitsmith's weight"):
        check_round_trip("layer", q, w, tensor)


@pytest.mark.parametrize(("bits", "symmetric", "granularity", "group"),
                         [(3, True, "group", 64), (4, True, "channel", None), (4, True, "group", 48), (2, False, "group", 32)])  # fmt: skip
def test_a_grid_no_gguf_type_holds_is_refused_by_name(bits: int, symmetric: bool, granularity: str,
                                                      group: int | None) -> None:  # fmt: skip
    q = UniformQuantizer(bits, symmetric, granularity, group_size=group)
    with pytest.raises(ValueError, match=r"gguf: layer 'model.layers.0.mlp.up_proj' has a .* grid, which no GGUF block "
                                         r"type holds; the grids that map: symmetric 8-bit -> Q8_0"):  # fmt: skip
        gguf_type("model.layers.0.mlp.up_proj", q)
