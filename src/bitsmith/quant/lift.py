"""The LiftQuant weight quantizer: a layer's weights as sign bits of a lift-then-project codebook.

The weight ``W`` (``out x in``) is rotated along its input dimension by a block Hadamard transform
(``hadamard`` columns per block, 0: none), each output row is divided by its RMS ``l``, the row is cut into
``m``-vectors and each vector is stored as the ``n`` signs of its codeword ``M y`` (``bitsmith.quant.lattice``).
Decoding: ``l * M y``, re-assembled and rotated back. Storage: ``n / m`` bits per weight plus one float
scale per row and the shared ``M``.

Encoding searches ``2^(n-m)`` candidates per vector, too slow to redo at every forward: the codes are found
once (by the ``liftquant`` method, or on the first observed tensor) and kept; ``forward`` returns their
decoded weights with a straight-through gradient. ``encode`` returns the kept codes when they still decode
to its input, so a checkpoint stores exactly the calibrated codes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from scipy.linalg import hadamard
from torch import Tensor

from bitsmith.quant.base import QUANTIZERS, Encoded, Quantizer
from bitsmith.quant.lattice import LiftCodebook

TINY = 1e-12


def check_hadamard(size: int) -> int:
    """``size`` if it is a power of two (checked without building the matrix: a huge one would be gigabytes)."""
    if type(size) is not int or size < 1 or size & (size - 1):
        raise ValueError(f"liftquant: the Hadamard block must be a power of two, got {str(size)[:20]}")
    return size


@functools.cache
def hadamard_block(size: int) -> Tensor:
    """The orthonormal ``size x size`` Sylvester Hadamard matrix (``size`` a power of two; the caller has checked
    that it divides the layer's inputs, which bounds it)."""
    check_hadamard(size)
    return torch.tensor(hadamard(size), dtype=torch.float32) / math.sqrt(size)


def rotate(weight: Tensor, block: int, inverse: bool = False) -> Tensor:
    """``W R`` (or ``W R^T``) for the block-diagonal Hadamard ``R`` along the last dimension."""
    if block <= 1:
        return weight
    if weight.shape[-1] % block:
        raise ValueError(f"liftquant: {weight.shape[-1]} input columns do not split into Hadamard blocks of "
                         f"{block}; set hadamard to a power of two dividing it, or 0")  # fmt: skip
    h = hadamard_block(block).to(weight)
    h = h.T if inverse else h
    return (weight.reshape(*weight.shape[:-1], -1, block) @ h).reshape(weight.shape)


def row_rms(weight: Tensor) -> Tensor:
    """Each row's root-mean-square (``out``), the per-row scale of the official ``bit_channel_convert``."""
    return weight.pow(2).mean(-1).sqrt().clamp(min=TINY)


@QUANTIZERS.register("lift")
class LiftQuantizer(Quantizer):
    """Weights as ``n`` sign bits per ``m`` values of the codebook ``{M y}``; per-row RMS scale; Hadamard."""

    kind = "lift"
    packed_exclude = ("signs",)

    def __init__(self, m: int, n: int, hadamard: int = 0, matrix: list[list[float]] | None = None) -> None:
        super().__init__()
        self.hadamard = hadamard
        if hadamard:
            check_hadamard(hadamard)
        initial = torch.zeros(m, n) if matrix is None else torch.tensor(matrix, dtype=torch.float32)
        if initial.shape != (m, n):
            raise ValueError(f"liftquant: matrix must be {m} x {n}, got {tuple(initial.shape)}")
        LiftCodebook(initial)  # validates m < n <= m + MAX_PADDING_BITS
        self.register_buffer("matrix", initial)
        self.register_buffer("row_scale", torch.empty(0))
        self.register_buffer("signs", torch.empty(0, dtype=torch.int8))  # (out, in / m, n), +-1
        self._decoded: Tensor | None = None

    @property
    def m(self) -> int:
        return self.matrix.shape[0]

    @property
    def n(self) -> int:
        return self.matrix.shape[1]

    @property
    def bits(self) -> float:  # type: ignore[override]
        return self.n / self.m

    @property
    def code_bits(self) -> float:  # type: ignore[override]
        return self.n / self.m

    @property
    def ready(self) -> bool:
        return self.signs.numel() > 0

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "m": self.m, "n": self.n, "hadamard": self.hadamard}

    def overhead_bits(self) -> int:
        return 32 * (self.row_scale.numel() + self.matrix.numel())

    def codebook(self) -> LiftCodebook:
        return LiftCodebook(self.matrix)

    # -- the transform around the codebook -------------------------------------------------
    def normalised(self, weight: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The rotated weight divided by its rows' RMS (``out x in``), and that RMS (``out``)."""
        if weight.dim() != 2 or weight.shape[1] % self.m:
            raise ValueError(f"liftquant: a {tuple(weight.shape)} weight does not split into vectors of "
                             f"{self.m}; pick m (set by bits and group) dividing the input width")  # fmt: skip
        rotated = rotate(weight.detach().float(), self.hadamard)
        scale = row_rms(rotated) if scale is None else scale
        return rotated / scale[:, None], scale

    def assemble(self, signs: Tensor, scale: Tensor, matrix: Tensor | None = None) -> Tensor:
        """The weight (``out x in``) that ``signs`` (``out, in / m, n``) and row scales decode to (with this
        quantizer's ``M`` unless ``matrix`` is given)."""
        codebook = LiftCodebook(self.matrix if matrix is None else matrix.float())
        normalised = codebook.decode(signs.float()).reshape(signs.shape[0], -1)
        return rotate(normalised * scale[:, None], self.hadamard, inverse=True)

    @torch.no_grad()
    def set_codes(self, signs: Tensor, scale: Tensor) -> Tensor:
        """Keep ``signs`` (``out, in / m, n``) and row scales as this quantizer's codes; returns the decoded
        weight."""
        self.signs = signs.to(torch.int8)
        self.row_scale = scale.float().clone()
        self._decoded = self.assemble(self.signs, self.row_scale)
        return self._decoded

    @torch.no_grad()
    def quantize_weight(self, weight: Tensor) -> Tensor:
        """Encode ``weight`` (nearest codewords, no error feedback), keep the codes; the decoded weight."""
        z, scale = self.normalised(weight)
        signs = self.codebook().encode(z.reshape(-1, self.m)).reshape(z.shape[0], -1, self.n)
        return self.set_codes(signs, scale)

    # -- the Quantizer contract -------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.quantize_weight(x)
            return x
        if not self.ready:
            raise RuntimeError("lift quantizer has no codes: run the liftquant method's calibration (or "
                               "calibrate_ on the weight) first")  # fmt: skip
        if self._decoded is None or self._decoded.device != x.device:
            self._decoded = self.assemble(self.signs, self.row_scale).to(x.device)
        return (self._decoded + (x - x.detach())).to(x.dtype)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Encoded:
        if not self.ready or not torch.equal(self(x).to(x.dtype), x):
            self.quantize_weight(x)  # the kept codes do not describe x: find its own
        codes = (self.signs.reshape(self.signs.shape[0], -1) > 0).to(torch.int32)
        return Encoded(codes, {"row_scale": self.row_scale.clone(), "matrix": self.matrix.clone()}, 1, 0)

    @torch.no_grad()
    def decode(self, enc: Encoded) -> Tensor:
        matrix, scale = enc.params["matrix"], enc.params["row_scale"]
        if matrix.shape != self.matrix.shape or enc.codes.shape != (scale.numel(), enc.codes.shape[1]):
            raise ValueError(f"lift codes {tuple(enc.codes.shape)} / matrix {tuple(matrix.shape)} do not fit "
                             f"m={self.m}, n={self.n} with {scale.numel()} rows")  # fmt: skip
        return self.assemble(self._signs(enc), scale.float(), matrix)

    def _signs(self, enc: Encoded) -> Tensor:
        """The +-1 signs (``out, in / m, n``) of 0/1 codes."""
        return (enc.codes.float() * 2 - 1).reshape(enc.params["row_scale"].numel(), -1, self.n)

    def restore(self, decoded: Tensor, enc: Encoded | None = None) -> None:
        if enc is not None:
            self.set_codes(self._signs(enc), enc.params["row_scale"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._decoded = None
