"""GPTQ (Frantar et al., ICLR 2023): weight-only quantization with second-order error compensation.

Spec: ``shared/methods/ptq-baselines.md``; official code ``IST-DASLab/gptq`` (``gptq.py``, ``fasterquant``).
Per linear, ``H = 2/n sum x x^T`` over its calibration inputs, dampened by ``damp * mean(diag H)``;
columns are quantized one at a time and the not-yet-quantized columns absorb the error
``(w_j - q_j) / [H^-1]_jj * [H^-1]_{j,:}`` through the upper Cholesky factor of ``H^-1``, in lazy blocks
of ``block_size`` columns. ``act_order`` visits columns by decreasing ``diag(H)``. Group scales: min-max
of each group of ``group_size`` input columns, taken when the walk reaches the group (of the error-updated
weights), per output row for ``group_size: 0``.

Calibration is sequential (``bitsmith.sequential``): decoder blocks one at a time, each fed by the blocks
already quantized; with ``true_sequential`` (the official LLaMA default) the linears inside a block are
quantized in the order they run (q/k/v, o, gate/up, down), each group seeing the outputs of the quantized
groups before it. Layers outside the decoder blocks (``lm_head``, embeddings) are not touched.

Deviations: with ``act_order`` and groups, the group scales are computed from the weights before any
update ("static groups", an option of the official code and the default of GPTQModel/AutoGPTQ for
act-order), because bitsmith's group layout is contiguous: the quantized model then needs no ``g_idx``
permutation. Bits per layer may come from an earlier method: a selected layer that already carries a
uniform weight quantizer (e.g. from ``mixed``) keeps its bits, group size and symmetry, so ``[mixed, gptq]``
is mixed-precision GPTQ.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.data import drop_padding
from bitsmith.method import Method, register_method
from bitsmith.nn import QLinear
from bitsmith.quant.functional import int_range
from bitsmith.quant.gguf_grid import GgufGrid, GgufGridName, range_params
from bitsmith.quant.layers import attach, float_weights, grouped_weight_quantizer
from bitsmith.quant.uniform import Bits, UniformQuantizer
from bitsmith.sequential import BlockInputs, StopBlock, run_block, sequential
from bitsmith.topology import DecoderTopology


def hessian_hook(hessians: dict[str, Tensor], counts: dict[str, int], name: str, fired: set[str], group: set[str]):
    """A forward hook adding ``2 x^T x / n`` of the layer's inputs to ``hessians[name]`` (running mean);
    ends the block's pass once every layer of ``group`` has run."""

    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        x = drop_padding(args[0].detach()).reshape(-1, args[0].shape[-1]).float()  # (real tokens, in)
        n_old, n_new = counts.get(name, 0), x.shape[0]
        total = n_old + n_new
        update = x.T @ x * (2.0 / total)
        hessians[name] = update if name not in hessians else hessians[name] * (n_old / total) + update
        counts[name] = total
        fired.add(name)
        if fired >= group:
            fired.clear()
            raise StopBlock

    return hook


def layer_hessians(
    selected: set[str], name: str, block: nn.Module, inputs: BlockInputs, topo: DecoderTopology,
    true_sequential: bool,
) -> Iterator[tuple[QLinear, Tensor]]:  # fmt: skip
    """The selected layers of decoder block ``name`` with the Hessians of their inputs, group by group:
    with ``true_sequential`` in the order the layers run (q/k/v, o, gate/up, down), each group's Hessians
    taken after the caller has compressed the groups before it (a generator: the next group runs only when
    the caller asks for it)."""
    mine = [n for n, _ in block.named_modules() if f"{name}.{n}" in selected]
    order = topo.sequential_order(block) if true_sequential else [tuple(mine)]
    order = [[n for n in group if n in mine] for group in order]
    leftover = [n for n in mine if not any(n in group for group in order)]
    for group in [g for g in order if g] + [[n] for n in leftover]:
        layers = [block.get_submodule(n) for n in group]
        hessians: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        fired: set[str] = set()
        hooks = {
            layer: hessian_hook(hessians, counts, n, fired, set(group)) for n, layer in zip(group, layers, strict=True)
        }
        with float_weights(layers):
            run_block(block, inputs, hooks)
        for n, layer in zip(group, layers, strict=True):
            if n not in hessians:  # an expert no calibration token was routed to: RTN (an identity Hessian)
                hessians[n] = torch.eye(layer.weight.shape[1])
            yield layer, hessians[n]


class GroupParams:
    """Scale and zero point of each (row, group), filled as the column walk reaches each group. A symmetric
    1-bit grid is binary: ``sign(w) * mean|w|`` per group (the official GEMQ GPTQ's 1-bit quantizer)."""

    def __init__(self, rows: int, columns: int, bits: int, group_size: int, symmetric: bool,
                 grid: GgufGrid | None = None) -> None:  # fmt: skip
        self.binary = bits == 1 and symmetric
        self.qmin, self.qmax = (-1, 1) if self.binary else int_range(bits, symmetric)
        self.group_size, self.symmetric, self.grid = group_size or columns, symmetric, grid
        # the columns whose parameters are fitted together: a group, or a K-quant super-block of groups
        self.span = self.group_size * (grid.per_super if grid else 1)
        groups = columns // self.group_size
        self.scale, self.zero = torch.zeros(rows, groups), torch.zeros(rows, groups)

    def fit(self, group: int, weights: Tensor) -> None:
        """Min-max (binary: mean |w|; on ``grid``: its parameters) of the groups from ``group`` on that ``weights``
        ``(rows, k * group_size)`` covers."""
        if self.binary:
            self.scale[:, group] = weights.abs().mean(1).clamp(min=1e-8)
            return
        rows, count = weights.shape[0], weights.shape[1] // self.group_size
        parts = weights.reshape(rows, count, self.group_size)
        lo, hi = parts.amin(-1).reshape(-1), parts.amax(-1).reshape(-1)
        scale, zero = range_params(self.grid, lo, hi, self.qmin, self.qmax, self.symmetric)
        self.scale[:, group : group + count] = scale.reshape(rows, count)
        self.zero[:, group : group + count] = zero.reshape(rows, count)

    def quantize(self, column: Tensor, index: int) -> Tensor:
        g = index // self.group_size
        s, z = self.scale[:, g], self.zero[:, g]
        if self.binary:
            return torch.where(column >= 0, s, -s)
        if self.grid is not None and not self.symmetric:  # a float zero point: codes round(x / s + z)
            return (torch.clamp(torch.round(column / s + z), self.qmin, self.qmax) - z) * s
        return (torch.clamp(torch.round(column / s) + z, self.qmin, self.qmax) - z) * s


def without_dead_columns(weight: Tensor, hessian: Tensor) -> tuple[Tensor, Tensor]:
    """Float copies of ``weight`` and ``hessian`` with the never-active input columns zeroed (their diagonal
    set to 1), as the official code does."""
    W, H = weight.detach().clone().float(), hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def inverse_hessian_factor(H: Tensor, damp: float) -> Tensor:
    """The upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``: row ``j`` spreads column ``j``'s error."""
    H = H + damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0])
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


@torch.no_grad()
def gptq_quantize(
    weight: Tensor, hessian: Tensor, bits: int, group_size: int, symmetric: bool, damp: float,
    act_order: bool, block_size: int, grid: GgufGrid | None = None,
) -> tuple[Tensor, GroupParams]:  # fmt: skip
    """The GPTQ-quantized ``weight`` ``(out, in)`` (values on the grid) and its group parameters. On a GGUF
    ``grid`` the parameters are the file's (fp16; K-quants: a super-block's group scales fitted together, when the
    walk reaches it from the weights as error feedback has left them, or with act-order from the weights before
    any update: static groups, so a GGUF block still holds consecutive columns)."""
    W, H = without_dead_columns(weight, hessian)
    rows, columns = W.shape
    params = GroupParams(rows, columns, bits, group_size, symmetric, grid)
    if grid is not None:
        block_size = max(block_size, params.span)  # a super-block lies inside one block
    size = params.group_size
    static = act_order or size == columns  # per-channel, or act-order: parameters before any update
    if static:
        for start in range(0, columns, params.span):
            params.fit(start // size, W[:, start : start + params.span])
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(columns)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_hessian_factor(H, damp)
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            column = int(perm[i1 + i])
            if not static and column % params.span == 0:  # a new group: min-max of W as the official code reads it
                params.fit(column // size, W[:, i1 + i : i1 + i + params.span])
            w, d = W1[:, i], Hinv1[i, i]
            q = params.quantize(w, column)
            Q[:, i1 + i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)], params


@register_method("gptq")
@dataclass
class GPTQ(Method):
    """Hessian-compensated weight-only quantization, decoder block by decoder block."""

    description = "GPTQ weight-only quantization (Hessian error compensation), sequential over decoder blocks"

    bits: Bits = 4
    group_size: Annotated[int, Field(ge=0)] = 128  # 0: per output channel
    symmetric: bool = False
    damp: Annotated[float, Field(gt=0, le=1)] = 0.01
    act_order: bool = True
    block_size: Annotated[int, Field(ge=1)] = 128
    true_sequential: bool = True
    grid: GgufGridName | None = None  # a llama.cpp GGUF grid (q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q6_k)

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        def weight_q(name: str, layer: nn.Module, overrides: dict[str, Any]) -> UniformQuantizer:
            if isinstance(layer.weight_q, UniformQuantizer):  # bits chosen by an earlier method (mixed)
                return layer.weight_q
            c = self.layer_config(overrides)
            return grouped_weight_quantizer("gptq", name, layer, c["bits"], c["group_size"], c["symmetric"],
                                            c["grid"])  # fmt: skip

        self._specs = attach(model, self.where, weight_q, None)
        return self._specs

    def calibrate(self, model: nn.Module, batches: Any) -> None:
        selected = set(self._specs)
        self._stats = sequential(model, batches, lambda *a: self._block(selected, *a), "gptq").__dict__

    def _block(
        self, selected: set[str], name: str, block: nn.Module, inputs: BlockInputs, topo: DecoderTopology
    ) -> None:
        for layer, hessian in layer_hessians(selected, name, block, inputs, topo, self.true_sequential):
            self._quantize(layer, hessian)

    def _quantize(self, layer: QLinear, hessian: Tensor) -> None:
        q: UniformQuantizer = layer.weight_q  # type: ignore[assignment]
        size = q.group_size if q.granularity == "group" else 0
        values, params = gptq_quantize(layer.weight, hessian, q.bits, size, q.symmetric, self.damp,
                                       self.act_order, self.block_size, q.grid)  # fmt: skip
        with torch.no_grad():
            layer.weight.copy_(values.to(layer.weight.dtype))
            q.scale = params.scale.reshape(-1).clone()
            q.zero_point = params.zero.reshape(-1).clone()
