"""Attach quantizers to layers: the shared step of every PTQ-style method."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from bitsmith.method import eval_mode, run_forward
from bitsmith.nn import QConv2d, QEmbedding, QLinear, QuantizedMixin, as_linear
from bitsmith.quant.base import Quantizer
from bitsmith.quant.gguf_grid import check_width, get_grid
from bitsmith.quant.uniform import UniformQuantizer
from bitsmith.select import Selection
from bitsmith.swap import swap

QuantizerFactory = Callable[[str, nn.Module, dict[str, Any]], Quantizer | None]


def to_quantized(module: nn.Module) -> QuantizedMixin:
    """``module`` as a ``QLinear`` / ``QConv2d`` (unchanged if it already is one)."""
    if isinstance(module, QuantizedMixin):
        return module
    if isinstance(module, nn.Conv2d):
        return QConv2d.from_float(module)
    if isinstance(module, nn.Embedding):
        return QEmbedding.from_float(module)
    try:
        return QLinear.from_float(as_linear(module))
    except TypeError:
        raise ValueError(
            f"cannot quantize a {type(module).__name__}: supported layers are Linear, Conv2d, Embedding and "
            "HF Conv1D; narrow the selection's 'types' or 'include'"
        ) from None


def input_channel_axis(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.Conv2d) else -1


def weight_input_size(module: nn.Module) -> int:
    """Number of input elements per output row of the weight (in_features or in/groups * kh * kw)."""
    weight = module.weight
    return weight[0].numel()


def uniform_weight_quantizer(
    name: str,
    module: nn.Module,
    bits: int,
    granularity: str,
    group_size: int | None,
    symmetric: bool,
    observer: str,
    float_zero: bool = False,
    grid: str | None = None,
) -> UniformQuantizer:
    """A weight quantizer calibrated on ``module``'s weight. Groups that do not divide the layer's
    input size fall back to per-channel scales, with a warning naming the layer."""
    if granularity == "group" and weight_input_size(module) % (group_size or 1):
        warnings.warn(
            f"group_size {group_size} does not divide the {weight_input_size(module)} inputs of layer "
            f"{name!r}; using per-channel scales for it",
            stacklevel=2,
        )
        granularity = "channel"
    q = UniformQuantizer(
        bits,
        symmetric,
        granularity,
        ch_axis=0,
        group_size=group_size,
        observer=observer,
        float_zero=float_zero,
        grid=grid,
    )
    masked = getattr(module, "masked_weight", None)  # a swapped layer's weight with its sparsity mask
    with torch.no_grad():
        q.calibrate_(masked() if callable(masked) else module.weight)
    return q


def grouped_weight_quantizer(method: str, name: str, module: nn.Module, bits: int, group_size: int,
                             symmetric: bool, grid: str | None = None) -> UniformQuantizer:  # fmt: skip
    """The weight quantizer of the LLM weight-only methods: groups of ``group_size`` inputs (0: per output
    channel), min-max. A group size that does not divide the layer is refused with the numbers (no fallback).
    ``grid``: a GGUF block grid instead (``bitsmith.quant.gguf_grid``), which fixes bits, groups and symmetry."""
    if grid is not None:
        spec = get_grid(grid)
        check_width(spec, name, weight_input_size(module))
        return uniform_weight_quantizer(name, module, spec.bits, "group", spec.group, spec.symmetric, "minmax",
                                        float_zero=not spec.symmetric, grid=spec.name)  # fmt: skip
    check_group(method, name, module, group_size, "or group_size 0 (per channel)")
    granularity = "group" if group_size else "channel"
    return uniform_weight_quantizer(name, module, bits, granularity, group_size or None, symmetric,
                                    weight_observer(bits, symmetric))  # fmt: skip


def check_group(method: str, name: str, module: nn.Module, group_size: int, other_fix: str) -> None:
    """A ``group_size`` that does not divide ``module``'s inputs is one line with the numbers and the fixes
    (a divisor, or ``other_fix``); 0 (per channel) always fits."""
    inputs = weight_input_size(module)
    if group_size and inputs % group_size:
        raise ValueError(f"{method}: group_size {group_size} does not divide the {inputs} inputs of layer {name!r}; "
                         f"choose a divisor (e.g. 32, 64) {other_fix}")  # fmt: skip


def weight_observer(bits: int, symmetric: bool) -> str:
    """Min-max ranges, except for a symmetric 1-bit (binary) grid: ``sign(w) * mean|w|`` per group (``absmean``;
    min-max would put both levels at ``+-max|w|``)."""
    return "absmean" if bits == 1 and symmetric else "minmax"


def weight_only_uniform(module: nn.Module) -> UniformQuantizer | None:
    """The weight quantizer of a weight-only, static, per-channel or per-group uniform ``QLinear`` (no input
    quantizer, mask or smoothing): the layers that pack to codes + scales; None for any other module."""
    if not isinstance(module, QLinear) or module.input_q is not None or module.mask is not None:
        return None
    q = module.weight_q
    plain = module.smooth is None and isinstance(q, UniformQuantizer) and not q.dynamic
    return q if plain and q.granularity in ("channel", "group") else None  # type: ignore[return-value]


def attach(
    model: nn.Module,
    where: Selection,
    weight_q: QuantizerFactory | None,
    input_q: QuantizerFactory | None,
) -> dict[str, dict[str, Any]]:
    """Swap the selected layers to quantized layers and set their quantizers from the factories.

    Each factory gets the layer's name, the (quantized) layer and its per-layer overrides, and returns a quantizer or
    ``None`` to leave that side unquantized.
    """

    def replace(name: str, module: nn.Module, overrides: dict[str, Any]) -> nn.Module:
        layer = to_quantized(module)
        if weight_q is not None:
            layer.weight_q = weight_q(name, layer, overrides)
        if input_q is not None and not isinstance(layer, QEmbedding):  # an embedding's input is indices
            layer.input_q = input_q(name, layer, overrides)
        return layer

    return swap(model, where, replace)


@contextlib.contextmanager
def float_weights(layers: list[QuantizedMixin]) -> Iterator[None]:
    """The layers compute with their float weights inside the block (their quantizers set aside)."""
    saved = [layer.weight_q for layer in layers]
    for layer in layers:
        layer.weight_q = None
    try:
        yield
    finally:
        for layer, q in zip(layers, saved, strict=True):
            layer.weight_q = q


@torch.no_grad()
def observe_inputs(model: nn.Module, layers: Iterable[str], batches: Iterable[Any]) -> None:
    """Calibrate the input quantizers of ``layers`` on ``batches`` (float inputs while observing)."""
    observe(model, [model.get_submodule(n).input_q for n in layers], batches)


def observe(model: nn.Module, quantizers: list[Quantizer | None], batches: Iterable[Any]) -> None:
    """Calibrate the static activation ``quantizers`` of ``model`` in one pass over ``batches`` (each sees float)."""
    observed = [q for q in quantizers if q is not None and not getattr(q, "dynamic", False)]
    if not observed:
        return
    for q in observed:
        q.start_observing()
    try:
        with eval_mode(model):
            for batch in batches:
                run_forward(model, batch)  # padding positions never reach the observers (drop_padding)
    except BaseException:
        for q in observed:  # stop without computing parameters from a partial pass; the error is the news
            q.observing = False
        raise
    for q in observed:
        q.stop_observing()
