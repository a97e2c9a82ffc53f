"""AWQ (Lin et al., MLSys 2024): activation-aware weight quantization.

Official code ``mit-han-lab/llm-awq`` (``awq/quantize/auto_scale.py``, ``auto_clip.py``). For every group
of linears fed by one tensor ``x`` (q/k/v after the attention norm, gate/up after the MLP norm, down after
up, o after v when the shapes chain), search per-input-channel scales ``s = mean|x|^r``, normalised by
``sqrt(max s * min s)``, over ``r in {0, 1/n_grid, ..., (n_grid-1)/n_grid}``: the weights become
``Q(W diag(s)) diag(s)^-1`` and the grid point with the least output error of the inspected module (the
attention for q/k/v, the MLP for gate/up, the linear itself otherwise) wins. The winning ``1/s`` is folded
into the feeder (the norm's gain, or the feeding linear's rows; ``bitsmith.topology``) and ``s`` into the
weights, so the float model is unchanged. Then (``clip``) each linear but q/k searches a per-group clipping
range ``max|w| * (1 - i/n_grid)``, ``i < max_shrink * n_grid``, on the output error of 512 sampled tokens.

Deviations: the scale search runs on the first ``search_batches`` calibration batches (CPU time; the
official code uses 128 samples of 512 tokens), and the decoder blocks are calibrated on the outputs of the
blocks *already quantized* (``bitsmith.sequential``, as GPTQ), where the official code passes float outputs on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.data import current_mask, drop_padding, real_token_mask
from bitsmith.method import Method, register_method
from bitsmith.nn import QLinear
from bitsmith.quant.gguf_grid import GgufGridName
from bitsmith.quant.layers import attach, float_weights, grouped_weight_quantizer
from bitsmith.quant.uniform import Bits, UniformQuantizer
from bitsmith.sequential import BlockInputs, run_block, sequential
from bitsmith.topology import DecoderTopology, Group

NO_CLIP = ("q_proj", "k_proj")  # the official code does not clip query/key weights (softmax is sensitive)
CLIP_TOKENS = 512


def fake_quantize(weight: Tensor, q: UniformQuantizer) -> Tensor:
    """``weight`` round-tripped through a fresh min-max quantizer of ``q``'s configuration."""
    fresh = UniformQuantizer(
        q.bits,
        q.symmetric,
        q.granularity,
        ch_axis=0,
        group_size=q.group_size,
        float_zero=q.float_zero,
        grid=q.grid.name if q.grid else None,
    )
    return fresh.calibrate_(weight)(weight)


@dataclass
class Captured:
    """What one pass of the block recorded: each linear's inputs (real tokens only) and the inspected modules'
    call arguments with the batch's padding mask."""

    inputs: dict[str, list[Tensor]]
    calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any], Tensor | None]]]


def capture(block: nn.Module, inputs: BlockInputs, groups: list[Group], batches: int) -> Captured:
    """Run the block (float weights) on its first ``batches`` calibration batches, recording what AWQ needs."""
    out = Captured({}, {})
    hooks: dict[nn.Module, Any] = {}
    pre: list[Any] = []
    for group in groups:
        first = block.get_submodule(group.linears[0])
        out.inputs[group.linears[0]] = []
        hooks[first] = lambda m, a, o, key=group.linears[0]: out.inputs[key].append(drop_padding(a[0].detach()))
        if group.inspect:
            out.calls[group.inspect] = []
            module = block.get_submodule(group.inspect)
            pre.append(module.register_forward_pre_hook(
                lambda m, a, kw, key=group.inspect: out.calls[key].append((a, kw, current_mask())),
                with_kwargs=True))  # fmt: skip
    try:
        run_block(block, inputs, hooks, batches=batches)
    finally:
        for handle in pre:
            handle.remove()
    return out


def _call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], mask: Tensor | None) -> Tensor:
    """The module's output for a recorded call, its padding positions dropped."""
    out = module(*args, **kwargs)
    with real_token_mask(mask):
        return drop_padding(out[0] if isinstance(out, (tuple, list)) else out)


@torch.no_grad()
def search_scales(
    block: nn.Module, group: Group, xs: list[Tensor], calls: list[Any] | None, n_grid: int
) -> tuple[Tensor, list[float]]:
    """The per-input-channel scales of ``group`` with the least output error, and the error per grid point."""
    linears: list[QLinear] = [block.get_submodule(n) for n in group.linears]
    x_mean = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).abs().float().mean(0)  # (in,)
    inspected = block.get_submodule(group.inspect) if group.inspect else None

    def outputs() -> list[Tensor]:
        if inspected is not None and calls is not None:
            return [_call(inspected, *call) for call in calls]
        return [torch.cat([layer(x) for layer in linears], dim=-1) for x in xs]

    originals = [layer.weight.detach().clone() for layer in linears]
    with float_weights(linears):
        reference = outputs()
    history, best, best_scales = [], float("inf"), torch.ones_like(x_mean)
    for step in range(n_grid):
        ratio = step / n_grid
        scales = x_mean.pow(ratio).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        for layer, weight in zip(linears, originals, strict=True):
            layer.weight.copy_(fake_quantize(weight * scales, layer.weight_q) / scales)
        with float_weights(linears):  # the weights already hold their quantized values
            error = sum(float((o - r).float().pow(2).mean()) for o, r in zip(outputs(), reference, strict=True))
        history.append(error / len(reference))
        if error < best:
            best, best_scales = error, scales
    for layer, weight in zip(linears, originals, strict=True):
        layer.weight.copy_(weight)
    return best_scales, history


@torch.no_grad()
def search_clip(layer: QLinear, x: Tensor, n_grid: int, max_shrink: float) -> Tensor:
    """Per (row, group) clipping bound of ``layer``'s weight with the least output error on sampled tokens."""
    q: UniformQuantizer = layer.weight_q  # type: ignore[assignment]
    weight = layer.weight.detach().float()
    size = q.group_size if q.granularity == "group" else weight.shape[1]
    tokens = x.reshape(-1, x.shape[-1]).float()
    tokens = tokens[:: max(1, tokens.shape[0] // CLIP_TOKENS)][:CLIP_TOKENS]  # (n, in)
    w = weight.view(weight.shape[0], -1, size)  # (out, groups, size)
    feats = tokens.view(tokens.shape[0], -1, size)  # (n, groups, size)

    def outputs(v: Tensor) -> Tensor:  # per-group partial outputs (out, n, groups), a batched matmul
        return torch.einsum("ngs,ogs->ong", feats, v)

    org_max = w.abs().amax(dim=-1, keepdim=True)  # (out, groups, 1)
    best_max = org_max.clone()
    reference = outputs(w)
    least = torch.full(org_max.shape[:2], float("inf"))
    for step in range(int(max_shrink * n_grid)):
        bound = org_max * (1 - step / n_grid)
        clipped = torch.maximum(torch.minimum(w, bound), -bound).reshape(weight.shape)
        quantized = fake_quantize(clipped, q).view_as(w)
        error = (outputs(quantized) - reference).pow(2).mean(dim=1)  # (out, groups)
        better = error < least
        least[better], best_max[better] = error[better], bound[better]
    return best_max.reshape(weight.shape[0], -1)  # (out, groups)


@register_method("awq")
@dataclass
class AWQ(Method):
    """Activation-aware scale search (+ clipping search) for weight-only quantization, block by block."""

    description = "AWQ weight-only quantization: activation-aware per-channel scales folded into the norms"

    bits: Bits = 4
    group_size: Annotated[int, Field(ge=0)] = 128  # 0: per output channel
    symmetric: bool = False
    n_grid: Annotated[int, Field(ge=1)] = 20
    clip: bool = True
    max_shrink: Annotated[float, Field(ge=0, lt=1)] = 0.5
    search_batches: Annotated[int, Field(ge=1)] = 2  # calibration batches the scale search runs on
    grid: GgufGridName | None = None  # a llama.cpp GGUF grid (q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q6_k)

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        def weight_q(name: str, layer: nn.Module, overrides: dict[str, Any]) -> UniformQuantizer:
            c = self.layer_config(overrides)
            return grouped_weight_quantizer("awq", name, layer, c["bits"], c["group_size"], c["symmetric"],
                                            c["grid"])  # fmt: skip

        self._specs = attach(model, self.where, weight_q, None)
        return self._specs

    def calibrate(self, model: nn.Module, batches: Any) -> None:
        self._history: dict[str, list[float]] = {}
        self._stats = sequential(model, batches, self._block, "awq").__dict__

    def _block(self, name: str, block: nn.Module, inputs: BlockInputs, topo: DecoderTopology) -> None:
        mine = {n for n, _ in block.named_modules() if f"{name}.{n}" in self._specs}
        groups = [g for g in topo.block_groups(block) if set(g.linears) <= mine]
        layers = [block.get_submodule(n) for n in sorted(mine)]
        with float_weights(layers):
            seen = capture(block, inputs, groups, self.search_batches)
        for group in groups:
            others = [block.get_submodule(n) for n in sorted(mine) if n not in group.linears]
            with float_weights(others):  # as the official search: only the group's own linears are quantized
                scales, history = search_scales(block, group, seen.inputs[group.linears[0]],
                                                seen.calls.get(group.inspect), self.n_grid)  # fmt: skip
            self._history[f"{name}.{group.prev}"] = history
            topo.divide_feeder(block, group, scales)
            for n in group.linears:
                block.get_submodule(n).weight.data.mul_(scales.view(1, -1))
        if self.clip:
            with float_weights(layers):
                seen = capture(block, inputs, [Group(n, (n,)) for n in sorted(mine)], 1)
            for n in sorted(mine):
                if n.rsplit(".", 1)[-1] in NO_CLIP:
                    continue
                layer = block.get_submodule(n)
                bound = search_clip(layer, seen.inputs[n][0], self.n_grid, self.max_shrink)
                size = layer.weight.shape[1] // bound.shape[1]
                limit = bound.repeat_interleave(size, dim=1)
                layer.weight.data = torch.maximum(torch.minimum(layer.weight.data, limit), -limit)
        for layer in layers:
            layer.weight_q.calibrate_(layer.weight)  # ranges of the scaled, clipped weights
