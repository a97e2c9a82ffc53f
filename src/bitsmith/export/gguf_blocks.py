"""bitsmith's grouped uniform weights as llama.cpp's block types (``ggml-quants.c``; the ``gguf`` package
de-quantizes them): the codes bitsmith chose, written without re-quantizing.

* ``Q8_0``: blocks of 32, one fp16 scale ``d``, int8 codes: ``x = d q`` (bitsmith: symmetric 8 bits).
* ``Q4_0``: blocks of 32, fp16 ``d``, 4-bit ``q`` in 0..15: ``x = d (q - 8)`` (bitsmith: symmetric 4 bits; its
  codes -8..7 are ``q - 8``). Byte ``j`` holds weight ``j`` in its low nibble and weight ``j + 16`` in its high.
* ``Q4_1``: blocks of 32, fp16 ``d`` and fp16 minimum ``m``, ``x = d q + m`` (bitsmith: asymmetric 4 bits,
  ``(c - z) s`` with ``d = s``, ``m = -z s``).
* ``Q5_0`` / ``Q5_1``: as ``Q4_0`` / ``Q4_1`` with 5-bit codes (``x = d (q - 16)`` / ``d q + m``): the low 4 bits as
  ``Q4``'s nibbles, the fifth bits in one little-endian 32-bit word per block (bit ``j``: weight ``j``).

A group of ``g`` weights (``g`` a multiple of 32) is ``g / 32`` blocks with the same scale. The scales (and
``m``) are stored in fp16: the file holds bitsmith's model with its scales rounded to fp16, and
``check_round_trip`` measures that against the model as optimised. A quantizer on a GGUF grid
(``bitsmith.quant.gguf_grid``: ``grid: q4_0`` etc.) already optimised with the stored scales, so its file is
its model to float32 rounding; the K-quants need such a grid:

* ``Q4_K``: super-blocks of 256 (``d``, ``dmin`` fp16; 12 bytes of 6-bit group scales and minimums; 128 bytes of
  nibbles, byte ``32 j + l`` holding weight ``64 j + l`` low and ``64 j + 32 + l`` high).
* ``Q6_K``: super-blocks of 256 (128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 group scales,
  fp16 ``d``), codes ``q + 32`` in 0..63.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants
from torch import Tensor

from bitsmith.quant.base import Encoded
from bitsmith.quant.gguf_grid import GgufGrid, super_scales
from bitsmith.quant.uniform import UniformQuantizer

BLOCK = 32
GRIDS = ("symmetric 8-bit -> Q8_0, symmetric 4 / 5-bit -> Q4_0 / Q5_0, asymmetric 4 / 5-bit -> Q4_1 / Q5_1, in "
         "groups of a multiple of 32; a quantizer with `grid:` q8_0 / q5_0 / q5_1 / q4_0 / q4_1 / q4_k / q6_k -> that "
         "type")  # fmt: skip
K_TYPES = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K)


@dataclass(frozen=True)
class GgufTensor:
    qtype: GGMLQuantizationType
    data: np.ndarray  # uint8 (rows, bytes per row)
    shape: tuple[int, int]


def gguf_type(name: str, q: UniformQuantizer) -> GGMLQuantizationType:
    """The block type whose grid equals ``q``'s, or one line naming the layer, its grid and the grids that map."""
    if q.grid is not None:
        return GGMLQuantizationType[q.grid.name.upper()]
    grouped = q.granularity == "group" and q.group_size is not None and q.group_size % BLOCK == 0
    kind = {(8, True): GGMLQuantizationType.Q8_0, (4, True): GGMLQuantizationType.Q4_0,
            (4, False): GGMLQuantizationType.Q4_1, (5, True): GGMLQuantizationType.Q5_0,
            (5, False): GGMLQuantizationType.Q5_1}.get((q._bits, q.symmetric))  # fmt: skip
    if not grouped or kind is None or q.dynamic or q.binary:
        grid = f"{q._bits}-bit {'symmetric' if q.symmetric else 'asymmetric'} {q.granularity}"
        grid += f" {q.group_size}" if q.granularity == "group" else ""
        raise ValueError(f"gguf: layer {name!r} has a {grid} grid, which no GGUF block type holds; the grids that "
                         f"map: {GRIDS}")  # fmt: skip
    return kind


def _fp16(x: Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy()


def pack(name: str, q: UniformQuantizer, weight: Tensor) -> GgufTensor:
    """``weight`` (``out x in``) encoded by ``q`` and written as the block type of ``gguf_type``."""
    qtype = gguf_type(name, q)
    enc = q.encode(weight.detach().float())
    rows, cols = enc.codes.shape
    if qtype in K_TYPES:
        assert q.grid is not None
        data = (_pack_q4_k if qtype == GGMLQuantizationType.Q4_K else _pack_q6_k)(q.grid, enc)
        return GgufTensor(qtype, data.reshape(rows, -1), (rows, cols))
    per_group = q.group_size // BLOCK  # type: ignore[operator]
    blocks = rows * cols // BLOCK
    codes = enc.codes.reshape(blocks, BLOCK).numpy()
    scale = enc.params["scale"].reshape(-1).repeat_interleave(per_group)
    d = _fp16(scale).reshape(blocks, 1).view(np.uint8)
    if qtype == GGMLQuantizationType.Q8_0:
        payload = [d, codes.astype(np.int8).view(np.uint8)]
    else:
        offset = {GGMLQuantizationType.Q4_0: 8, GGMLQuantizationType.Q5_0: 16}.get(qtype, 0)  # signed -> unsigned
        nibbles = (codes + offset).astype(np.uint8)
        packed = (nibbles[:, : BLOCK // 2] & 0x0F) | ((nibbles[:, BLOCK // 2 :] & 0x0F) << np.uint8(4))
        payload = [d, packed]
        if qtype in (GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1):  # bit j of qh: weight j's fifth bit
            fifth = (nibbles >> 4).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
            payload = [d, fifth.sum(1, dtype=np.uint32).astype("<u4").reshape(blocks, 1).view(np.uint8), packed]
        if qtype in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_1):
            zero = enc.params["zero_point"].reshape(-1).repeat_interleave(per_group)
            minimum = _fp16(-zero * scale.to(torch.float16).float()).reshape(blocks, 1).view(np.uint8)
            payload = [d, minimum, *payload[1:]]
    return GgufTensor(qtype, np.concatenate(payload, axis=1).reshape(rows, -1), (rows, cols))


def _pack_q4_k(grid: GgufGrid, enc: Encoded) -> np.ndarray:
    """``(super-blocks, 144)`` bytes: ``d``, ``dmin``, the 6-bit scales / minimums, the nibbles."""
    scale = enc.params["scale"].float()
    d, sc = super_scales(grid, scale)
    dmin, mn = super_scales(grid, enc.params["zero_point"].float() * scale)  # the minimum ``z s`` (>= 0)
    sc, mn = sc.to(torch.uint8).numpy(), mn.to(torch.uint8).numpy()
    low, high = sc[:, 4:], mn[:, 4:]
    packed_scales = np.concatenate([sc[:, :4] | ((low >> 4) << 6), mn[:, :4] | ((high >> 4) << 6),
                                    (low & 0x0F) | ((high & 0x0F) << 4)], axis=1)  # fmt: skip
    q = enc.codes.reshape(-1, 4, 2, 32).numpy().astype(np.uint8)  # (blocks, pairs of groups, 2, 32)
    nibbles = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_fp16(d).view(np.uint8), _fp16(dmin).view(np.uint8), packed_scales, nibbles], axis=1)


def _pack_q6_k(grid: GgufGrid, enc: Encoded) -> np.ndarray:
    """``(super-blocks, 210)`` bytes: low nibbles, high 2-bit pairs, int8 group scales, ``d``."""
    d, sc = super_scales(grid, enc.params["scale"].float())
    q = (enc.codes.reshape(-1, 2, 128).numpy() + 32).astype(np.uint8)  # (blocks, halves, 128)
    low, high = q & 0x0F, q >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(-1, 128)
    high = high.reshape(-1, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.to(torch.int8).numpy().view(np.uint8), _fp16(d).view(np.uint8)], axis=1)


def unpack(tensor: GgufTensor) -> Tensor:
    """The float weight the ``gguf`` package de-quantizes from ``tensor`` (llama.cpp's arithmetic)."""
    return torch.from_numpy(quants.dequantize(tensor.data, tensor.qtype)).reshape(tensor.shape)


def check_round_trip(name: str, q: UniformQuantizer, weight: Tensor, tensor: GgufTensor) -> float:
    """The largest difference between the file's weight and bitsmith's, relative to the layer's largest weight;
    raises when an element exceeds what fp16 scales allow: half an fp16 step (relative ``2^-11``, or the
    subnormal step ``2^-25`` absolute) of ``d`` times ``|code|``, and of ``m = -z d`` (``|z|`` steps of ``d``
    plus its own rounding), with a float32 margin."""
    enc = q.encode(weight.detach().float())
    ours = q.decode(enc)
    rows, cols = enc.codes.shape

    def spread(values: Tensor) -> Tensor:  # one value per group -> one per weight
        return values.reshape(-1).repeat_interleave(q.group_size).reshape(rows, cols)  # type: ignore[arg-type]

    scale, zero = spread(enc.params["scale"]).abs(), spread(enc.params["zero_point"]).abs()
    code = enc.codes.float().abs() if q.symmetric else enc.codes.float()
    bound = (2.0**-11 * scale + 2.0**-25) * (code + 2 * zero) + 1e-6 * ours.abs() + 1e-12
    difference = (unpack(tensor) - ours).abs()
    worst = int(torch.argmax(difference - bound))
    if float((difference - bound).reshape(-1)[worst]) > 0:
        raise ValueError(f"gguf: layer {name!r} written as {tensor.qtype.name} differs from bitsmith's weight by "
                         f"{float(difference.reshape(-1)[worst]):.3g} at element {worst} (bound "
                         f"{float(bound.reshape(-1)[worst]):.3g} from the fp16 scales): the export is wrong")  # fmt: skip
    return float(difference.max()) / max(float(ours.abs().max()), 1e-30)
