"""LiftQuant (ICML 2026): arbitrary bit-width LLM weights via dimensional lifting and projection.

Spec: ``shared/methods/liftquant.md``; official code ``Heliulu/LiftQuant`` (``lattice_generator2.py``,
``quantize/tmplinear.py``). Each weight row is rotated by a block Hadamard transform, divided by its RMS, cut
into ``m``-vectors, and each vector is stored as the ``n`` sign bits of its codeword ``M y`` with a trained
``M`` (``bitsmith.quant.lattice``): ``n / m`` bits per weight, so 2.5 bits (20 signs per 8 weights) is as
easy as 2 or 3. ``M`` is trained data-free once per ``(m, n)`` and cached under the bitsmith cache. The
shapes are the official lattices': 2.0 -> 16to8, 2.5 -> 20to8, 3.0 -> 18to6 (``group`` 8, at most
``search_bits`` = 12 padding bits, 4,096 candidates per vector); the official 3-bit 24to8 needs
``search_bits: 16`` (65,536 candidates, about 20x the encoding time of 18to6 on a CPU).

With ``error_feedback`` (the default, decoder LLMs) the layers are quantized block by block through
``bitsmith.sequential`` with GPTQ's column-wise error compensation in the rotated space (Hessian ``R^T H R``):
``m`` columns at a time are encoded jointly, then their errors flow into the columns not yet quantized.
Without it, and for selected layers outside the decoder blocks (``lm_head``), each layer is encoded
directly (nearest codewords; any model, no data).

Deviations: the official pipeline first trains OmniQuant-style learnable scales (``a1``, ``a2``) and
transforms per block against the FP block output ("intra-block correction", 2 epochs on 4096 samples) before
converting to the codebook; bitsmith keeps the fixed Hadamard rotation and GPTQ error feedback (both also
in the spec) and trains nothing per block. The rotation is block-diagonal (``hadamard`` columns per block)
rather than the official Kronecker ``H1 W H2`` over the whole row. Columns are visited in their natural
order (no act-order: a vector's ``m`` columns must stay contiguous to be stored together). The encoder adds
a greedy bit-flip pass after the candidate search (``bitsmith.quant.lattice``). ``M`` is trained with
bitsmith's own generator, so it is not the official ``lattice/*.pt`` file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bitsmith.files import atomic_write
from bitsmith.method import Method, register_method
from bitsmith.methods.llm.gptq import inverse_hessian_factor, layer_hessians, without_dead_columns
from bitsmith.nn import QLinear
from bitsmith.progress import log
from bitsmith.quant.lattice import DEFAULT_PADDING_BITS, MAX_PADDING_BITS, LiftCodebook, rate_pair
from bitsmith.quant.layers import attach
from bitsmith.quant.lift import LiftQuantizer, rotate, row_rms
from bitsmith.sequential import BlockInputs, sequential
from bitsmith.topology import DecoderTopology

SHIPPED = Path(__file__).resolve().parent.parent / "quant" / "codebooks"  # default-setting M's, as trained here


def trained_codebook(m: int, n: int, steps: int, restarts: int, seed: int) -> LiftCodebook:
    """``M`` for ``(m, n)``: shipped with bitsmith for the default settings (trained by this same function), else
    trained once and cached (``lift-{n}to{m}-...safetensors`` in the bitsmith cache)."""
    from bitsmith.zoo import cache_dir

    name = f"lift-{n}to{m}-steps{steps}-restarts{restarts}-seed{seed}.safetensors"
    path = SHIPPED / name if (SHIPPED / name).is_file() else cache_dir() / "lattice" / name
    if path.exists():
        try:
            matrix = load_file(path)["matrix"]
            if matrix.shape == (m, n) and bool(torch.isfinite(matrix).all()):
                return LiftCodebook(matrix)
        except Exception as exc:  # a damaged cache entry is retrained, not fatal
            log.warning(f"liftquant: retraining the damaged cached codebook {path} ({exc})")
    log.info(f"liftquant: training the {n}to{m} codebook ({restarts} x {steps} steps; cached afterwards)")
    codebook = LiftCodebook.train(m, n, steps=steps, restarts=restarts, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({"matrix": codebook.matrix.contiguous()}, tmp))
    return codebook


def codebook_from_file(path: Path, m: int, n: int, bits: float) -> LiftCodebook:
    """A user's ``M`` (safetensors, key ``matrix``), checked against the ``(m, n)`` that ``bits`` needs."""
    try:
        matrix = load_file(path)["matrix"]
    except Exception as exc:
        raise ValueError(f"liftquant: codebook_file {path} cannot be read as safetensors with a 'matrix' "
                         f"tensor ({str(exc)[:120]})") from None  # fmt: skip
    if tuple(matrix.shape) != (m, n) or not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"liftquant: codebook_file {path} holds a {'x'.join(map(str, matrix.shape))} M; bits {bits} "
                         f"(group {m}) needs a finite {m}x{n} M (n / m bits per weight)")  # fmt: skip
    return LiftCodebook(matrix.float())


@torch.no_grad()
def lift_gptq(weight: Tensor, hessian: Tensor, q: LiftQuantizer, damp: float, block_size: int) -> Tensor:
    """GPTQ with the lift codebook: the signs (``out, in / m, n``) of ``weight`` in ``q``'s rotated, row-normalised
    space, ``m`` columns encoded at a time, their errors compensated in the columns after them. Sets ``q``'s
    codes and returns the decoded weight."""
    W, H = without_dead_columns(weight, hessian)
    W = rotate(W, q.hadamard)  # W x = (W R)(R^T x): inputs rotate by R^T, so H -> R^T H R
    H = rotate(rotate(H, q.hadamard).T.contiguous(), q.hadamard).T
    scale = row_rms(W)
    codebook, m = q.codebook(), q.m
    Hinv = inverse_hessian_factor(H, damp)
    rows, columns = W.shape
    signs = torch.zeros(rows, columns // m, q.n)
    block_size = max(m, block_size // m * m)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for c in range(0, i2 - i1, m):
            y = codebook.encode(W1[:, c : c + m] / scale[:, None])  # (rows, n)
            signs[:, (i1 + c) // m] = y
            quantized = codebook.decode(y) * scale[:, None]  # (rows, m)
            for k in range(m):  # fixing the vector's columns one after another = fixing them jointly (OBS)
                i = c + k
                err = (W1[:, i] - quantized[:, k]) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return q.set_codes(signs, scale)


@register_method("liftquant")
@dataclass
class LiftQuant(Method):
    """Weight-only lift-then-project codebooks at fractional bits, with GPTQ error feedback."""

    description = "LiftQuant: n sign bits per m weights decoded by a trained M (fractional bits), GPTQ feedback"

    bits: Annotated[float, Field(gt=1, le=4)] = 2.5  # bits per weight = n / m
    group: Annotated[int, Field(ge=1, le=16)] = 8  # preferred m (vector length); the rate may force another
    search_bits: Annotated[int, Field(ge=1, le=MAX_PADDING_BITS)] = DEFAULT_PADDING_BITS  # n - m at most
    hadamard: Annotated[int, Field(ge=0)] = 64  # columns per Hadamard block (power of two); 0: no rotation
    error_feedback: bool = True  # GPTQ-style, decoder block by block (needs a decoder LLM)
    damp: Annotated[float, Field(gt=0, le=1)] = 0.01
    block_size: Annotated[int, Field(ge=1)] = 128
    true_sequential: bool = True
    codebook_file: str | None = None  # a safetensors file with `matrix` (m x n) instead of training one
    codebook_steps: Annotated[int, Field(ge=1)] = 3000
    codebook_restarts: Annotated[int, Field(ge=1)] = 5
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.m, self.n = rate_pair(self.bits, self.group, self.search_bits)

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        quantizers: list[LiftQuantizer] = []

        def weight_q(name: str, layer: nn.Module, overrides: dict[str, Any]) -> LiftQuantizer:
            if not isinstance(layer, QLinear):
                raise ValueError(f"liftquant: {name!r} is a {type(layer).__name__}; only Linear layers are "
                                 "supported (narrow `where` to Linears)")  # fmt: skip
            c = self.layer_config(overrides)
            q = LiftQuantizer(self.m, self.n, c["hadamard"])
            q.normalised(torch.ones(1, layer.in_features))  # refuses widths that m or the rotation cannot split
            quantizers.append(q)
            return q

        self._specs = attach(model, self.where, weight_q, None)
        # every layer is checked before the codebook is trained (minutes to an hour for the 4,096-candidate ones)
        if self.codebook_file is not None:
            codebook = codebook_from_file(Path(self.codebook_file), self.m, self.n, self.bits)
        else:
            codebook = trained_codebook(self.m, self.n, self.codebook_steps, self.codebook_restarts, self.seed)
        for q in quantizers:
            q.matrix.copy_(codebook.matrix)
        return self._specs

    def calibrate(self, model: nn.Module, batches: Any) -> None:
        if self.error_feedback:
            selected = set(self._specs)
            self._stats = sequential(model, batches, lambda *a: self._block(selected, *a), "liftquant").__dict__
        rest = [n for n in self._specs if not model.get_submodule(n).weight_q.ready]
        if rest and self.error_feedback:
            log.warning(f"liftquant: {len(rest)} selected layers lie outside the decoder blocks ({rest[:3]}): "
                        "encoded without error feedback")  # fmt: skip
        for name in rest:
            layer: QLinear = model.get_submodule(name)  # type: ignore[assignment]
            with torch.no_grad():
                layer.weight.copy_(layer.weight_q.quantize_weight(layer.weight))  # type: ignore[union-attr]

    def _block(
        self, selected: set[str], name: str, block: nn.Module, inputs: BlockInputs, topo: DecoderTopology
    ) -> None:
        for layer, hessian in layer_hessians(selected, name, block, inputs, topo, self.true_sequential):
            decoded = lift_gptq(layer.weight, hessian, layer.weight_q, self.damp, self.block_size)
            with torch.no_grad():
                layer.weight.copy_(decoded.to(layer.weight.dtype))
