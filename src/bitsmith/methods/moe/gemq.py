"""GEMQ (Deng et al., 2025, "GEMQ: Global Expert-Level Mixed-Precision Quantization for MoE LLMs"): bit-widths
allocated per expert across all MoE layers by one integer program, then GPTQ per expert and an optional
router-only fine-tune.

Spec: ``shared/methods/gemq.md``; official code ``jndeng/GEMQ`` (``compute_model_stats.py``,
``allocation/ilp_solvers.py``, ``quantize.py``). Steps:

1. One backward pass of the next-token loss over ``gradient_windows`` calibration windows records
   ``G_l = dL/dy_l`` at every MoE block's output.
2. Block by block (inputs propagated through the unquantized model), for each expert ``e`` and candidate width
   ``b``: only that expert is quantized with RTN at ``b`` bits (groups of ``group_size``; 1 bit: the official
   binary ``sign(w) * mean|w|``), and the
   gradient-weighted change of the block output is its coefficient ``c[l, e, b] = sum G_l^2 (y_l - y_l^(e,b))^2``
   (a diagonal-Fisher estimate of the loss increase). Routing does not change (the router's input does not),
   so only the tokens routed to ``e`` contribute.
3. ``allocation: global``: one integer program over every expert of every layer (``bitsmith.alloc``, scipy's
   HiGHS): one width per expert, ``sum c`` minimal, average bits per expert weight ``<= bits``; with ``c2c3``
   (default, as the official scripts)
   every layer keeps at least one expert at the highest and one at the second-highest width. ``layer``: the same
   program per layer with the same budget per layer; ``uniform``: every expert at ``bits``.
4. The experts are quantized at their widths with ``quantizer`` (GPTQ by default, or RTN), groups of
   ``group_size``.
5. ``router_epochs`` of router-only fine-tuning (AdamW ``router_lr`` 1e-4, weight decay 1e-4, one window per
   step, next-token loss; everything else frozen) adapts the routing to the quantized experts. The hard top-k
   passes gradients to the router by a straight-through softmax.

Deviations: the paper's models are Mixtral / DeepSeek MoEs with softmax-weighted experts; bitsmith's MoE blocks
are FactorLLM's (top-k, ``E / k`` rescaling), hence the straight-through router gradient. Statistics on
``gradient_windows`` of the calibration windows (the paper: 128 x 2048 tokens of C4); attention and other
layers are left as they are (the paper's scripts quantize them separately, e.g. to 4 bits); no progressive
re-solving.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from bitsmith.alloc import AtLeast, Budget, allocate
from bitsmith.data import token_windows
from bitsmith.finetune import only_trainable
from bitsmith.method import Method, build_method, register_method
from bitsmith.methods.moe.experts import Expert, MoEFeedForward, selected_moe_layers
from bitsmith.progress import log
from bitsmith.quant.layers import grouped_weight_quantizer
from bitsmith.sequential import BlockInputs, module_inputs, sequential
from bitsmith.topology import DecoderTopology, topology_of

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
Coefficients = dict[str, dict[int, float]]  # expert name -> width -> gradient-weighted output error


def output_gradients(
    model: nn.Module, moes: dict[str, MoEFeedForward], windows: list[Tensor]
) -> dict[str, list[Tensor]]:
    """``G_l^2`` (``tokens, hidden``) at each MoE block's output, per window, from the next-token loss."""
    squares: dict[str, list[Tensor]] = {name: [] for name in moes}

    def keep(name: str):
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            output.register_hook(lambda g: squares[name].append(g.detach().reshape(-1, g.shape[-1]).pow(2)))

        return hook

    embed = model.get_input_embeddings()
    handles = [moe.register_forward_hook(keep(name)) for name, moe in moes.items()]
    handles.append(embed.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True)))
    try:
        with only_trainable(model, []):  # activations' gradients only; no weight gradients
            for ids in windows:
                model(input_ids=ids, labels=ids).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return squares


@torch.no_grad()
def rtn_expert(expert: Expert, bits: int, group_size: int, name: str) -> Expert:
    """A copy of ``expert`` with every projection rounded to ``bits`` (groups of ``group_size``): asymmetric
    min-max, and at 1 bit the official binary ``sign(w) * mean|w|`` (min-max {0, range} zeroes most weights)."""
    quantized = copy.deepcopy(expert)
    for proj in PROJECTIONS:
        layer = quantized.get_submodule(proj)
        q = grouped_weight_quantizer("gemq", f"{name}.{proj}", layer, bits, group_size, bits == 1)
        layer.weight.copy_(q(layer.weight))
    return quantized


@torch.no_grad()
def expert_coefficients(moe: MoEFeedForward, name: str, inputs: list[Tensor], squares: list[Tensor],
                        candidates: list[int], group_size: int) -> Coefficients:  # fmt: skip
    """``c[e][b] = sum G^2 (y - y^(e,b))^2`` over the windows' tokens, for one MoE block."""
    scale = moe.num_experts / moe.top_k
    out: Coefficients = {}
    for e, expert in enumerate(moe.experts):
        unit = f"{name}.experts.{e}"
        quantized = {b: rtn_expert(expert, b, group_size, unit) for b in candidates}
        out[unit] = dict.fromkeys(candidates, 0.0)
        for x, g2 in zip(inputs, squares, strict=True):
            flat = x.reshape(-1, x.shape[-1])
            rows = (moe.choose(flat, moe.router(flat)) == e).any(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            reference = expert(flat[rows])
            for b, q in quantized.items():
                out[unit][b] += float((g2[rows] * (scale * (reference - q(flat[rows]))).pow(2)).sum())
    return out


@register_method("gemq")
@dataclass
class GEMQ(Method):
    """Expert-level mixed precision for MoE blocks: gradient-weighted coefficients, a global ILP, GPTQ per expert."""

    description = "GEMQ: per-expert bit-widths from a global integer program on gradient-weighted output errors"

    bits: Annotated[float, Field(gt=0)] = 2.0  # average bits per expert weight
    candidates: list[int] = field(default_factory=lambda: [1, 2, 3])
    allocation: Literal["global", "layer", "uniform"] = "global"
    c2c3: bool = True  # as the official scripts (extra_constr=c2c3): each layer keeps its two widest widths
    quantizer: Literal["gptq", "rtn"] = "gptq"
    group_size: Annotated[int, Field(ge=0)] = 128
    symmetric: bool = False
    gradient_windows: Annotated[int, Field(ge=1)] = 8
    router_epochs: Annotated[int, Field(ge=0)] = 1
    router_lr: Annotated[float, Field(gt=0)] = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.candidates or any(not 1 <= b <= 8 for b in self.candidates):
            raise ValueError(f"gemq: candidates must be bit-widths in 1..8; got {self.candidates}")
        self.candidates = sorted(set(self.candidates))
        if not self.candidates[0] <= self.bits <= self.candidates[-1]:
            raise ValueError(f"gemq: bits {self.bits} must lie within the candidates' range "
                             f"{self.candidates[0]}..{self.candidates[-1]}")  # fmt: skip
        if self.allocation == "uniform" and self.bits not in self.candidates:
            raise ValueError(f"gemq: uniform allocation needs bits among the candidates {self.candidates}")

    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        self._moes = list(selected_moe_layers(model, self.where, "gemq"))
        return {}

    def calibrate(self, model: nn.Module, batches: Any) -> None:
        batches = list(batches)
        moes = {name: model.get_submodule(name) for name in self._moes}
        if self.allocation == "uniform":
            self.assigned = {f"{n}.experts.{e}": int(self.bits) for n, m in moes.items() for e in range(m.num_experts)}
        else:
            windows = token_windows(batches)[: self.gradient_windows]
            if not windows:
                raise ValueError("gemq needs calibration token windows for its gradients")
            squares = output_gradients(model, moes, windows)
            self.coefficients = self._coefficients(model, moes, windows, squares)
            self.assigned = self.solve(self.coefficients, moes)
        sizes = self._sizes(moes)
        average = sum(self.assigned[u] * sizes[u] for u in sizes) / sum(sizes.values())
        log.info(f"gemq: {self.allocation} allocation, {average:.3f} bits per expert weight on average")
        self.average_bits = average
        self._quantize(model, batches)
        if self.router_epochs:
            self.router_history = self._tune_routers(model, moes, token_windows(batches))

    def _coefficients(self, model: nn.Module, moes: dict[str, MoEFeedForward], windows: list[Tensor],
                      squares: dict[str, list[Tensor]]) -> Coefficients:  # fmt: skip
        coefficients: Coefficients = {}

        def block(name: str, module: nn.Module, inputs: BlockInputs, topology: DecoderTopology) -> None:
            moe_name = f"{name}.{topology.ffn}"
            if moe_name not in moes:
                return
            moe = moes[moe_name]
            captured = module_inputs(module, inputs, moe)
            coefficients.update(expert_coefficients(moe, moe_name, captured, squares[moe_name], self.candidates,
                                                    self.group_size))  # fmt: skip

        topology_of(model)  # a clear error for a model without decoder blocks
        sequential(model, [{"input_ids": ids} for ids in windows], block, "gemq coefficients")
        return coefficients

    def _sizes(self, moes: dict[str, MoEFeedForward]) -> dict[str, int]:
        return {f"{n}.experts.{e}": sum(p.numel() for p in expert.parameters())
                for n, m in moes.items() for e, expert in enumerate(m.experts)}  # fmt: skip

    def solve(self, coefficients: Coefficients, moes: dict[str, MoEFeedForward]) -> dict[str, int]:
        """The width of every expert: one program over all layers (global) or one per layer."""
        sizes = self._sizes(moes)
        groups = [list(sizes)] if self.allocation == "global" else [[u for u in sizes if u.startswith(f"{n}.")]
                                                                      for n in moes]  # fmt: skip
        assigned: dict[str, int] = {}
        for units in groups:
            cost = {u: coefficients[u] for u in units}
            use = {u: {b: b * sizes[u] for b in self.candidates} for u in units}
            budget = Budget("average bits", use, self.bits * sum(sizes[u] for u in units))
            assigned |= allocate(cost, [budget], self._c2c3(units, moes))
        return assigned

    def _c2c3(self, units: list[str], moes: dict[str, MoEFeedForward]) -> list[AtLeast]:
        if not self.c2c3 or len(self.candidates) < 2:
            return []
        out = []
        for name in moes:
            mine = [u for u in units if u.startswith(f"{name}.")]
            if not mine:  # a per-layer program holds one layer's experts only
                continue
            for width in self.candidates[-2:]:
                out.append(AtLeast(f"c2c3 ({name} at {width} bits)", [(u, width) for u in mine], 1))
        return out

    def _quantize(self, model: nn.Module, batches: list[Any]) -> None:
        overrides = {f"{u}.{p}": {"bits": b, **({"symmetric": True} if b == 1 else {})}  # 1 bit: binary
                     for u, b in self.assigned.items() for p in PROJECTIONS}  # fmt: skip
        entry = {"name": self.quantizer, "bits": max(self.candidates), "group_size": self.group_size,
                 "symmetric": self.symmetric, "where": {"include": list(overrides), "overrides": overrides}}  # fmt: skip
        method = build_method(entry)
        method.prepare(model)
        if method.uses("calibrate"):
            method.calibrate(model, batches)

    def _tune_routers(self, model: nn.Module, moes: dict[str, MoEFeedForward], windows: list[Tensor]) -> list[float]:
        routers = [p for m in moes.values() for p in m.router.parameters()]
        optimizer = torch.optim.AdamW(routers, lr=self.router_lr, weight_decay=1e-4)
        history: list[float] = []
        try:
            for moe in moes.values():
                moe.straight_through = True
            model.eval()
            with only_trainable(model, routers):
                for _ in range(self.router_epochs):
                    for step, ids in enumerate(windows):
                        loss = model(input_ids=ids, labels=ids).loss
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        history.append(float(loss.detach()))
                        if (step + 1) % 10 == 0:
                            log.info(f"gemq: router fine-tune step {step + 1}/{len(windows)}, loss {history[-1]:.4f}")
        finally:
            for moe in moes.values():
                moe.straight_through = False
        return history
