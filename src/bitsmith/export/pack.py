"""Pack b-bit unsigned integer codes densely into bytes, and unpack them exactly (1 <= b <= 16)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack(codes: Tensor, bits: int) -> Tensor:
    """Little-endian bit stream of ``codes`` (integers in ``[0, 2^bits)``) as a flat uint8 tensor."""
    if not 1 <= bits <= 16:
        raise ValueError(f"can pack 1..16-bit codes, got {bits}")
    values = codes.detach().flatten().to(torch.int64).cpu().numpy()
    if values.size and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits}-bit packing: [{values.min()}, {values.max()}]")
    if bits == 8:
        return torch.from_numpy(values.astype(np.uint8))
    if bits == 16:
        return torch.from_numpy(values.astype("<u2").view(np.uint8).copy())
    bit_matrix = ((values[:, None] >> np.arange(bits)) & 1).astype(np.uint8)  # (n, bits), LSB first
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1), bitorder="little"))


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of ``pack``: ``numel`` codes as int32."""
    data = packed.detach().cpu().numpy().astype(np.uint8, copy=False)
    if data.size != packed_nbytes(numel, bits):
        raise ValueError(f"packed data has {data.size} bytes, expected {packed_nbytes(numel, bits)} "
                         f"for {numel} codes of {bits} bits")  # fmt: skip
    if bits == 8:
        return torch.from_numpy(data.astype(np.int32))
    if bits == 16:
        return torch.from_numpy(data.view("<u2").astype(np.int32))
    bit_stream = np.unpackbits(data, count=numel * bits, bitorder="little").reshape(numel, bits)
    weights = (1 << np.arange(bits)).astype(np.int32)
    return torch.from_numpy(bit_stream.astype(np.int32) @ weights)
