"""Block reconstruction (BRECQ, Li et al. 2021): quantize a model one unit at a time, each unit's weight rounding
(AdaRound) and activation steps (LSQ) learned so that its output matches the float model's.

A unit is a block the user names (any module: a residual block, a transformer block, a U-Net stage) or a single
quantized layer outside every named block (layer-wise reconstruction). Units are reconstructed in the order the
model runs them. A unit's inputs are those the already-quantized model feeds it (BRECQ's and Q-Diffusion's
``asym`` setting); its targets are the float model's outputs of the same unit on the same calibration batches (a
float copy taken before any rounding is written, as the official codes keep each layer's original weight).
The objective is ``|f_q(x) - f(x)|^p`` summed over channels and averaged over examples and positions (the official
``lp_loss``; p = 2.4 by default) plus ``lam * sum(1 - |2h(V) - 1|^beta)`` with ``beta`` annealed from 20 to 2
after a warm-up without it; then the rounding is made hard and written into the weights, so the model is an
ordinary uniformly quantized one (exported like any PTQ model). Each unit reports its output error before and
after and the share of rounding variables still undecided (``0 < h(V) < 1``) when hardened.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.method import eval_mode, run_forward
from bitsmith.nn import QuantizedMixin
from bitsmith.progress import log
from bitsmith.quant.adaround import (
    AdaRound,
    SplitAdaRound,
    learnable_steps,
    rectified_sigmoid,
    rounding_for,
    rounding_regularizer,
)


@dataclass(frozen=True)
class ReconstructionConfig:
    iters: int = 1000
    a_iters: int | None = None  # None: the steps are learned with the rounding; else a second pass of a_iters
    batch_size: int = 32
    lam: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    w_lr: float = 1e-3
    a_lr: float = 4e-4
    p: float = 2.4
    seed: int = 0


class StopForward(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


def units(model: nn.Module, layers: list[str], blocks: list[str]) -> list[tuple[str, list[str]]]:
    """``(unit module name, its quantized layers)`` in module order: each module matching a ``blocks`` glob (the
    outermost match) with the layers inside it, then every other layer alone."""
    names = [name for name, _ in model.named_modules() if name]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in blocks)]
    outer = [n for n in chosen if not any(n.startswith(f"{o}.") for o in chosen)]
    out: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for name in names:
        if name in outer:
            inside = [layer for layer in layers if layer == name or layer.startswith(f"{name}.")]
            if inside:
                out.append((name, inside))
                seen.update(inside)
        elif name in layers and name not in seen and not any(name.startswith(f"{o}.") for o in outer):
            out.append((name, [name]))
            seen.add(name)
    return out


@contextlib.contextmanager
def float_layers(model: nn.Module, layers: list[str] | None = None, weights: bool = True) -> Iterator[None]:
    """The quantized ``layers`` (default: every quantized layer) compute in float inside the block: their inputs,
    and their weights unless ``weights`` is false."""
    if layers is None:
        found = [m for m in model.modules() if isinstance(m, QuantizedMixin)]
    else:
        found = [model.get_submodule(n) for n in layers]
    saved = [(layer.weight_q, layer.input_q) for layer in found]
    for layer in found:
        layer.weight_q, layer.input_q = (None if weights else layer.weight_q), None
    try:
        yield
    finally:
        for layer, (w, a) in zip(found, saved, strict=True):
            layer.weight_q, layer.input_q = w, a


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone(
            memory_format=torch.contiguous_format
        )  # an attention output's strides crashed backward
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


@torch.no_grad()
def capture(model: nn.Module, name: str, batches: list[Any], what: str) -> list[Any]:
    """For each batch, the unit's call ``(args, kwargs)`` (``what="inputs"``) or its output (``"outputs"``)."""
    module = model.get_submodule(name)
    seen: list[Any] = []

    def on_input(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((_detach(args), _detach(kwargs)))
        raise StopForward

    def on_output(_m: nn.Module, _args: Any, output: Any) -> None:
        seen.append(_detach(output))
        raise StopForward

    handle = (module.register_forward_pre_hook(on_input, with_kwargs=True) if what == "inputs"
              else module.register_forward_hook(on_output))  # fmt: skip
    try:
        with eval_mode(model):
            for batch in batches:
                with contextlib.suppress(StopForward):
                    run_forward(model, batch)
    finally:
        handle.remove()
    return seen


def _tensors(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors(item)]
    return [t for t in (getattr(output, "sample", None),) if isinstance(t, Tensor)]


def _rows(value: Any, index: Tensor, n: int) -> Any:
    """The rows ``index`` of every tensor with ``n`` rows in a nested call; other values unchanged."""
    if isinstance(value, Tensor):
        return value[index] if value.dim() and value.shape[0] == n else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, index, n) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, index, n) for k, v in value.items()}
    return value


def _cat(values: list[Any]) -> Any:
    """Concatenate calls of several batches along the batch dimension (tensors; other values from the first)."""
    first = values[0]
    if isinstance(first, Tensor):
        return torch.cat(values) if first.dim() else first
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([v[i] for v in values]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _cat([v[k] for v in values]) for k in first}
    return first


def lp_loss(pred: list[Tensor], target: list[Tensor], p: float) -> Tensor:
    """``|f_q - f|^p`` summed over the channel dimension (dim 1) and averaged over everything else (examples and
    positions), as the official ``lp_loss``: the rounding regulariser's weight ``lam`` is then on its intended scale."""
    return sum((a - b).abs().pow(p).sum(1).mean() for a, b in zip(pred, target, strict=True))  # type: ignore[return-value]


def undecided_share(rounders: list[Any]) -> float:
    """The share of rounding variables with ``0 < h(V) < 1``: not yet rounded down or up (hardening decides them)."""
    values = [rectified_sigmoid(a.detach()).reshape(-1) for r in rounders for a in r.alphas()]
    if not values:
        return 0.0
    h = torch.cat(values)
    return float(((h > 0) & (h < 1)).float().mean())


def reconstruct_unit(
    model: nn.Module, reference: nn.Module, name: str, layers: list[str], batches: list[Any],
    cfg: ReconstructionConfig, rounding: bool = True, steps: bool = True, iters: int | None = None,
) -> dict[str, float]:  # fmt: skip
    """Learn the rounding of ``layers``' weights (``rounding``) and their input steps (``steps``) for ``iters``
    (default ``cfg.iters``) so that unit ``name`` matches the float ``reference`` (a copy of the model taken before
    any rounding was written); write the hard rounding into the weights. Returns the unit's output error before
    and after."""
    calls = _cat(capture(model, name, batches, "inputs"))
    with float_layers(reference):
        targets = [_cat(list(parts)) for parts in zip(*[_tensors(o) for o in capture(reference, name, batches, "outputs")], strict=True)]  # fmt: skip
    unit = model.get_submodule(name)
    found = [model.get_submodule(n) for n in layers]
    rounders = []
    for layer in found if rounding else []:
        rounder = rounding_for(layer.weight_q, layer.masked_weight())
        if rounder is not None:
            layer.weight_q = rounder
            rounders.append(rounder)
    learned = [step for layer in found if steps for step in learnable_steps(layer.input_q)]
    n = targets[0].shape[0]
    args, kwargs = calls

    def error(index: Tensor | None = None) -> Tensor:
        index = torch.arange(n) if index is None else index
        out = _tensors(unit(*_rows(args, index, n), **_rows(kwargs, index, n)))
        return lp_loss(out, [t[index] for t in targets], cfg.p)

    for rounder in rounders:  # "before": nearest rounding (the soft rounding starts at the float weight)
        rounder.set_hard(True)
    with torch.no_grad(), eval_mode(unit):
        before = float(error())
    for rounder in rounders:
        rounder.set_hard(False)
    optimizers = []
    if rounders:
        optimizers.append(torch.optim.Adam([a for r in rounders for a in r.alphas()], lr=cfg.w_lr))
    if learned:
        for step in learned:
            step.requires_grad_(True)
        optimizers.append(torch.optim.Adam(learned, lr=cfg.a_lr))
    generator = torch.Generator().manual_seed(cfg.seed)
    iters = cfg.iters if iters is None else iters
    warm = int(cfg.warmup * iters)
    with eval_mode(unit):
        for it in range(iters if optimizers else 0):
            index = torch.randint(0, n, (min(cfg.batch_size, n),), generator=generator)
            loss = error(index)
            if it >= warm and rounders:
                progress = (it - warm) / max(1, iters - warm)
                beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - progress)
                loss = loss + cfg.lam * sum(rounding_regularizer(a, beta) for r in rounders for a in r.alphas())
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            with torch.no_grad():
                for step in learned:
                    step.clamp_(min=1e-8)
    for step in learned:
        step.requires_grad_(False)
    undecided = undecided_share(rounders)
    for layer in found:
        if isinstance(layer.weight_q, (AdaRound, SplitAdaRound)):
            rounder = layer.weight_q
            with torch.no_grad():
                layer.weight.copy_(rounder.rounded_weight(layer.masked_weight()))
            layer.weight_q = rounder.base
    with torch.no_grad(), eval_mode(unit):
        after = float(error())
    log.debug(f"reconstructed {name}: output error {before:.4g} -> {after:.4g}, {100 * undecided:.1f} % undecided")
    return {"before": before, "after": after, "undecided": undecided}


@torch.no_grad()
def execution_order(model: nn.Module, plan: list[tuple[str, list[str]]], batch: Any) -> list[tuple[str, list[str]]]:
    """``plan`` sorted by when each unit first runs in a forward pass of ``batch`` (modules are not always
    registered in the order they run: a U-Net's middle block runs before its decoder); units that never run last."""
    first: dict[str, int] = {}

    def seen(name: str) -> Any:
        def hook(_m: nn.Module, _args: Any) -> None:
            first.setdefault(name, len(first))

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(seen(name)) for name, _ in plan]
    try:
        with float_layers(model), eval_mode(model):
            run_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(plan, key=lambda unit: first.get(unit[0], len(plan)))


def reconstruct(model: nn.Module, layers: list[str], blocks: list[str], batches: list[Any], cfg: ReconstructionConfig) -> dict[str, dict[str, float]]:  # fmt: skip
    """Reconstruct every unit of ``model`` in the order they run (see the module); returns each unit's error before
    and after (``"<unit> (steps)"`` for the second pass). With ``cfg.a_iters`` set, the official codes' two passes:
    the rounding of every unit with the activations in float, then the activation steps with the hard rounding."""
    plan = execution_order(model, units(model, layers, blocks), batches[0])
    reference = copy.deepcopy(model)  # the rounding is written into the model's weights: keep the float ones
    if cfg.a_iters is None:
        return _reconstruct_all(model, reference, plan, batches, cfg, "block reconstruction", steps=True)
    with float_layers(model, weights=False):
        result = _reconstruct_all(model, reference, plan, batches, cfg, "rounding pass", steps=False)
    steps = _reconstruct_all(model, reference, plan, batches, cfg, "activation-step pass", rounding=False,
                             iters=cfg.a_iters)  # fmt: skip
    return result | {f"{name} (steps)": errors for name, errors in steps.items()}


def _reconstruct_all(model: nn.Module, reference: nn.Module, plan: list[tuple[str, list[str]]], batches: list[Any],
                     cfg: ReconstructionConfig, what: str, **learn: Any) -> dict[str, dict[str, float]]:  # fmt: skip
    result = {}
    for i, (name, inside) in enumerate(plan):
        result[name] = reconstruct_unit(model, reference, name, inside, batches, cfg, **learn)
        log.info(f"{what} {i + 1}/{len(plan)} {name} ({len(inside)} layer(s)): output error "
                 f"{result[name]['before']:.4g} -> {result[name]['after']:.4g}")  # fmt: skip
    return result
